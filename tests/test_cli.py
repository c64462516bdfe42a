"""The command lines of train.py, sample.py and `python -m vqgpt.eval`: every flag has help and shows its
default, --cfg-scale beside --cfg, --preset checked first, user errors in one line (exit 2, --debug for the
traceback), and out of memory naming the flag to lower. In-process: no interpreter start per case."""

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

from vqgpt.cli import HelpFormatter, pick_device, run_or_exit

ROOT = Path(__file__).resolve().parents[1]


def script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), ROOT / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """Flags without help text, or whose help shows no default."""
    bad = []
    for p in parsers(parser):
        formatter = p.formatter_class(prog=p.prog)
        assert isinstance(formatter, HelpFormatter), p.prog
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            text = formatter._get_help_string(action) if action.help else ""
            if not action.help or ("default" not in text and not action.required):
                bad.append(f"{p.prog} {'/'.join(action.option_strings)}")
    return bad


def test_every_flag_has_help_and_shows_its_default():
    from vqgpt import eval as veval

    train_parser, _ = script("train.py").parse_args(["tokenizer"])
    for parser in (train_parser, script("sample.py").build_parser(), veval.build_parser()):
        assert undocumented(parser) == []
    help_text = script("sample.py").build_parser().format_help()
    assert "--batch-size BATCH_SIZE" in help_text and "(default: 64)" in help_text


def test_cfg_scale_is_accepted_beside_cfg():
    from vqgpt import eval as veval

    sample = script("sample.py")
    assert sample.parse_args(["--ckpt", "m", "--cfg-scale", "2.5"]).cfg == 2.5
    assert sample.parse_args(["--ckpt", "m", "--cfg", "2.5"]).cfg == 2.5
    assert veval.parse_args(["recall", "--ckpt", "m", "--cfg-scale", "1.5"]).cfg == 1.5
    assert veval.parse_args(["adherence", "--ckpt", "m", "--cfg-scale", "1", "3"]).cfg == [1.0, 3.0]


def test_an_unknown_preset_stops_before_any_data_work(tmp_path, capsys):
    train = script("train.py")
    missing = tmp_path / "no-such-folder"  # were the data read first, this would be the error
    with pytest.raises(SystemExit) as e:
        train.main(["gpt", "--preset", "huge", "--data", str(missing), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "invalid choice: 'huge'" in err and "no-such-folder" not in err
    assert not (tmp_path / "run").exists()


def test_a_bad_ckpt_is_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    sample = script("sample.py")
    argv = ["--ckpt", str(tmp_path / "nothing"), "--prompt", "x", "--out", str(tmp_path / "g.png")]
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: no text-to-image model directory")
    with pytest.raises(FileNotFoundError, match="no text-to-image model directory"):
        sample.main([*argv, "--debug"])
    with pytest.raises(SystemExit) as e:
        sample.main([*argv[:2], "--out", str(tmp_path / "g.png")])  # no prompt
    assert e.value.code == 2 and capsys.readouterr().err == "error: give at least one --prompt or a --prompts file\n"


def test_out_of_memory_names_the_flag_to_lower(capsys):
    def sample_too_much():
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 40.00 GiB (GPU 0; 79.3 GiB total)\n"
            "Of the allocated memory 70 GiB is allocated by PyTorch ..."
        )

    with pytest.raises(SystemExit) as e:
        run_or_exit(sample_too_much, oom_hint="lower --batch-size (now 512)")
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: out of memory (CUDA out of memory. Tried to allocate 40.00 GiB")
    assert err.rstrip().endswith(": lower --batch-size (now 512)")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has an MPS device")
def test_device_mps_is_offered_and_refused_where_torch_has_none():
    assert "mps" in script("sample.py").build_parser().parse_args(["--ckpt", "m", "--device", "mps"]).device
    with pytest.raises(ValueError, match="torch sees no MPS device"):
        pick_device("mps")
    assert pick_device("cpu") == "cpu" and pick_device("auto") in ("cpu", "cuda")


def test_the_sampling_flags_are_one_family_in_every_script():
    """sample.py and `vqgpt.eval` take the same sampling flags with the same help (vqgpt/cli.py); train.py gpt
    takes them as --sample-*, the defaults saved with the model, which become its SamplingConfig."""
    from dataclasses import asdict
    from types import SimpleNamespace

    from vqgpt import eval as veval
    from vqgpt.cli import SAMPLING_FLAGS, sampling_overrides
    from vqgpt.generate import SamplingConfig
    from vqgpt.stages import saved_sampling

    flags = [
        "--cfg",
        "2",
        "--cfg-schedule",
        "interval",
        "--cfg-interval",
        "5",
        "--top-k",
        "7",
        "--top-p",
        "0.9",
        "--temperature",
        "0.5",
    ]
    given = {
        "cfg_scale": 2.0,
        "cfg_schedule": "interval",
        "cfg_interval": 5,
        "top_k": 7,
        "top_p": 0.9,
        "temperature": 0.5,
    }
    assert set(given) == set(SAMPLING_FLAGS)
    sample = script("sample.py")
    assert sampling_overrides(sample.parse_args(["--ckpt", "m", *flags])) == given
    assert sampling_overrides(sample.parse_args(["--ckpt", "m", "--top-k", "7"])) == {"top_k": 7}
    assert sampling_overrides(veval.parse_args(["recall", "--ckpt", "m", *flags])) == given
    several = veval.parse_args(["adherence", "--ckpt", "m", "--cfg", "1", "3", *flags[2:]])  # --cfg: scales to score
    assert several.cfg == [1.0, 3.0] and sampling_overrides(several, cfg_flag=False) == {
        k: v for k, v in given.items() if k != "cfg_scale"
    }

    _, args = script("train.py").parse_args(["gpt", *(f"--sample-{a[2:]}" if a[:2] == "--" else a for a in flags)])
    assert sampling_overrides(args, saved=True) == given
    assert asdict(saved_sampling(args, None, SimpleNamespace(image_vocab_size=64))) == given
    _, unset = script("train.py").parse_args(["gpt"])
    assert saved_sampling(unset, None, SimpleNamespace(image_vocab_size=64)) == SamplingConfig()

    def helps(parser):
        return {
            a.dest: a.help
            for a in parser._actions
            if a.dest in {"cfg", "cfg_schedule", "cfg_interval", "top_k", "top_p", "temperature", "rerank", "scorer"}
        }

    recall = next(p for p in parsers(veval.build_parser()) if p.prog.endswith(" recall"))
    assert len(helps(recall)) == 8 and helps(recall) == helps(sample.build_parser())


def test_scripts_stay_short_and_read_top_to_bottom():
    """train.py is a command line over vqgpt/stages.py; no function of the scripts or of vqgpt runs over 80 lines
    (nested functions count toward the one that holds them)."""
    import ast

    files = ["train.py", "sample.py", "app.py"] + sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "vqgpt").rglob("*.py")
    )
    long = []
    for name in files:
        for node in ast.walk(ast.parse((ROOT / name).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno] + [d.lineno for d in node.decorator_list])
                if node.end_lineno - start + 1 > 80:
                    long.append(f"{name}:{node.lineno} {node.name} ({node.end_lineno - start + 1} lines)")
    assert long == []
    assert len((ROOT / "train.py").read_text().splitlines()) <= 350
