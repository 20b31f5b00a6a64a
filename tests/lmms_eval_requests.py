"""What the wrapper tests share: lmms-eval chat tasks on local data, their requests built as the evaluator
builds them, and a wrapper created as lmms-eval's simple_evaluate creates it."""

from pathlib import Path


def build_tasks(include_path, names, model_name: str, limit):
    """Task name -> ConfigurableMessagesTask with its requests built (``limit`` docs per task; None = all)."""
    from lmms_eval.api.task import ConfigurableMessagesTask
    from lmms_eval.utils import load_yaml_config

    built = {}
    for name in names:
        config = load_yaml_config(str(Path(include_path) / f"{name}.yaml"), mode="full")
        task = ConfigurableMessagesTask(config=config, model_name=model_name)
        task.build_all_requests(limit=limit, rank=0, world_size=1)
        built[name] = task
    return built


def all_requests(tasks):
    return [instance for task in tasks.values() for instance in task.instances]


def load_wrapper(model_id, checkpoint, tasks=None, batch_size=1, **model_args):
    """The wrapper from its model_args (dtype float32), with lmms-eval's task_dict filled for ``tasks``."""
    from lmms_eval.models import get_model

    arg_string = ",".join([f"pretrained={checkpoint}", "dtype=float32", *(f"{k}={v}" for k, v in model_args.items())])
    # What lmms-eval's simple_evaluate passes; --batch_size arrives as a string.
    lm = get_model(model_id).create_from_arg_string(
        arg_string, {"batch_size": str(batch_size), "max_batch_size": None, "device": None})
    for name, task in (tasks or {}).items():
        lm.task_dict[name] = task.dataset
    return lm
