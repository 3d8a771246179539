"""Profiling: a short training trace that TensorBoard's profile plugin (xprof) reads."""
import glob
import json

import pytest
from xprof.convert import raw_to_tool_data

from bench import trace_kernels
from microgpt import train
from tests.test_train import TINY


def test_training_trace_reads_in_the_profile_plugin(corpus, tmp_path, capsys):
    cfg = train.TrainConfig(**{**TINY, "data": corpus, "max_steps": 4, "eval_every": 4})
    result = train.train(cfg, out=str(tmp_path / "run"), sample=False,
                         profile_dir=str(tmp_path / "prof"), profile_steps=(1, 3))
    assert result.stopped == "finished"
    paths = glob.glob(str(tmp_path / "prof" / "**" / "*.xplane.pb"), recursive=True)
    assert len(paths) == 1, paths
    assert "trace_viewer@" in raw_to_tool_data.xspace_to_tool_names(paths)
    data, content_type = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer", {})
    assert content_type == "application/json"
    events = json.loads(data)["traceEvents"]
    # the traced train steps (microgpt.train.make_train_step's jitted `step`) are in the trace
    assert sum(e.get("name") == "PjitFunction(step)" for e in events) >= 2
    # bench/trace_kernels.py reads the same capture and checks names in it
    assert trace_kernels.event_totals(tmp_path / "prof")["PjitFunction(step)"][1] >= 2
    assert trace_kernels.main([str(tmp_path / "prof"), "--expect", "PjitFunction(step)"]) == 0
    assert trace_kernels.main([str(tmp_path / "prof"), "--expect", "no_such_kernel"]) == 1
    capsys.readouterr()
    assert trace_kernels.main([str(tmp_path / "prof"), "--device"]) == 0   # a CPU capture
    assert "no device kernels in" in capsys.readouterr().out


def test_the_profile_extra_and_dev_install_tensorboard():
    """profiles/README's `tensorboard --logdir profiles/` works after `pip install -e .[dev]`."""
    import shutil
    assert shutil.which("tensorboard"), "the tensorboard command is not on PATH"


@pytest.mark.parametrize("spec", ["20", "a:b", "5:5", "-1:3"])
def test_profile_steps_are_checked(spec):
    with pytest.raises(ValueError, match="profile-steps"):
        train.parse_steps(spec)
