// lmms-quant leaderboard page: sort by a header click, filter rows by words, show every column.
// Sorting is done by a header's click handler only; `?sort=<column key>&desc=1` on load clicks the
// header (twice for descending), so a link (or a test) exercises exactly what a click does.
// `?filter=words` fills the filter box and `?all=1` ticks "all metrics".
(function () {
  var table = document.getElementById('leaderboard');
  var body = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function cellValue(row, index, numeric) {
    var cell = row.cells[index];
    var raw = cell.getAttribute('data-value');
    if (numeric) { var v = parseFloat(raw); return isNaN(v) ? null : v; }
    return (raw === null ? cell.textContent : raw).toLowerCase();
  }
  function sortBy(th) {
    var index = headers.indexOf(th);
    var numeric = th.getAttribute('data-type') === 'num';
    var ascending = th.getAttribute('aria-sort') !== 'ascending';
    headers.forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
    var rows = Array.prototype.slice.call(body.rows);
    rows.forEach(function (row, i) { row._order = i; });
    rows.sort(function (a, b) {
      var x = cellValue(a, index, numeric), y = cellValue(b, index, numeric);
      if (x === y) return a._order - b._order;
      if (x === null || x === '') return 1;   // empty cells last, either direction
      if (y === null || y === '') return -1;
      var c = x < y ? -1 : 1;
      return ascending ? c : -c;
    });
    rows.forEach(function (row) { body.appendChild(row); });
  }
  headers.forEach(function (th) { th.addEventListener('click', function () { sortBy(th); }); });
  var filter = document.getElementById('filter');
  function applyFilter() {
    var terms = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
    var shown = 0;
    Array.prototype.forEach.call(body.rows, function (row) {
      var text = row.textContent.toLowerCase();
      var keep = terms.every(function (t) { return text.indexOf(t) >= 0; });
      row.hidden = !keep;
      if (keep) shown += 1;
    });
    document.getElementById('shown').textContent = shown;
  }
  filter.addEventListener('input', applyFilter);
  var showAll = document.getElementById('show-all');
  function applyShowAll() { table.classList.toggle('show-all', showAll.checked); }
  showAll.addEventListener('change', applyShowAll);
  var params = new URLSearchParams(window.location.search);
  if (params.get('filter')) { filter.value = params.get('filter'); }
  if (params.get('all') === '1') { showAll.checked = true; }
  applyFilter();
  applyShowAll();
  var key = params.get('sort');
  if (key) {
    var th = headers.filter(function (h) { return h.getAttribute('data-key') === key; })[0];
    if (th) { th.click(); if (params.get('desc') === '1') th.click(); }
  }
  document.body.setAttribute('data-ready', '1');
})();
