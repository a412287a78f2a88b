"""Bad CLI input exits non-zero (2 for usage errors) with a one-line error that names the
option, never a traceback, and is rejected before any model is loaded."""

from __future__ import annotations

import pytest

import layerzero_serve._cli as cli
import layerzero_serve._models as models
from layerzero_serve._cli import MAX_DEMO_REPEAT, _token_id_prompts, build_parser, main
from layerzero_serve._cli_doctor import BLOCK_SIZE_MAX
from layerzero_serve.config import INT32_MAX, MAX_NUM_SEQS, EngineConfig
from layerzero_serve.errors import ValidationError
from layerzero_serve.selection import configure, reload_policy, set_selector

CPU = ["--fake-device", "cpu", "--model", "dummy:tiny"]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("LZ_KERNEL_POLICY", raising=False)
    set_selector(None)
    configure(reset=True)
    reload_policy()
    yield
    set_selector(None)
    configure(reset=True)


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if generate/demo gets as far as building the LLM."""

    def _llm(args):
        raise AssertionError("the model was loaded before the input was validated")

    monkeypatch.setattr(cli, "_llm", _llm)


def _one_line_error(err: str, option: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and option in lines[0], err
    return lines[0]


def _usage_error(capsys, argv: list[str], option: str) -> str:
    """argparse rejects ``argv``: exit 2, the last stderr line names ``option``."""
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error: argument " + option in last, err
    return last


# C1: a missing or unreadable model is a one-line --model error, not a traceback.


@pytest.mark.parametrize("cmd", ["doctor", "explain"])
def test_missing_model_dir_names_model(cmd, capsys, tmp_path):
    missing = str(tmp_path / "nonexistent")
    assert main([cmd, "--fake-device", "cpu", "--model", missing]) == 2
    line = _one_line_error(capsys.readouterr().err, "--model")
    assert missing in line and "config.json" in line


@pytest.mark.parametrize("cmd", ["doctor", "explain"])
@pytest.mark.parametrize(
    "config",
    ["{bad json", '{"architectures": ["NotAModel"]}', "\xff\xfe"],
    ids=["bad-json", "unsupported", "not-utf8"],
)
def test_invalid_model_config_names_model(cmd, config, capsys, tmp_path):
    (tmp_path / "config.json").write_bytes(config.encode("latin-1"))
    assert main([cmd, "--fake-device", "cpu", "--model", str(tmp_path)]) == 2
    _one_line_error(capsys.readouterr().err, "--model")


@pytest.mark.parametrize("cmd", ["doctor", "explain"])
def test_unreadable_model_dir_names_model(cmd, capsys, monkeypatch, tmp_path):
    def denied(src):
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(models, "load_config", denied)
    assert main([cmd, "--fake-device", "cpu", "--model", str(tmp_path)]) == 2
    line = _one_line_error(capsys.readouterr().err, "--model")
    assert "Permission denied" in line


def test_unknown_dummy_preset_names_model(capsys):
    assert main(["doctor", "--fake-device", "cpu", "--model", "dummy:nope"]) == 2
    line = _one_line_error(capsys.readouterr().err, "--model")
    assert "dummy:tiny" in line  # lists what is allowed


def test_oserror_while_loading_is_one_line_exit_1(capsys, monkeypatch):
    def _llm(args):
        raise PermissionError(13, "Permission denied", "/cache/lz")

    monkeypatch.setattr(cli, "_llm", _llm)
    assert main(["generate", "--quiet", "--model", "dummy:tiny"]) == 1
    _one_line_error(capsys.readouterr().err, "Permission denied")


def test_generate_missing_model_names_model(capsys, tmp_path):
    missing = str(tmp_path / "nonexistent")
    assert main(["generate", "--quiet", "--device", "cpu", "--model", missing]) == 2
    _one_line_error(capsys.readouterr().err, "--model")


# C2/C3: doctor and explain check their options with the engine's ranges.


@pytest.mark.parametrize(
    "argv, option",
    [
        (["doctor", "--dtype", "int8"], "--dtype"),
        (["doctor", "--dtype", "garbage"], "--dtype"),
        (["doctor", "--block-size", "0"], "--block-size"),
        (["doctor", "--block-size", "-16"], "--block-size"),
        (["doctor", "--block-size", str(BLOCK_SIZE_MAX + 1)], "--block-size"),
        (["doctor", "--block-size", "x"], "--block-size"),
        (["doctor", "--max-num-seqs", "0"], "--max-num-seqs"),
        (["doctor", "--max-num-seqs", "100000000", "--fake-device", "h100"], "--max-num-seqs"),
        (["doctor", "--max-num-seqs", str(MAX_NUM_SEQS + 1)], "--max-num-seqs"),
        (["explain", "--batch", "-5"], "--batch"),
        (["explain", "--batch", "0"], "--batch"),
        (["explain", "--batch", str(MAX_NUM_SEQS + 1)], "--batch"),
        (["explain", "--q-len", "-1"], "--q-len"),
        (["explain", "--q-len", str(INT32_MAX + 1)], "--q-len"),
        (["explain", "--block-size", "0"], "--block-size"),
        (["explain", "--dtype", "fp8"], "--dtype"),
    ],
)
def test_doctor_explain_reject_bad_options(argv, option, capsys):
    _usage_error(capsys, argv, option)


def test_doctor_ranges_are_the_engines():
    EngineConfig(block_size=BLOCK_SIZE_MAX, max_num_seqs=MAX_NUM_SEQS)
    with pytest.raises(ValidationError, match="block_size"):
        EngineConfig(block_size=BLOCK_SIZE_MAX + 1)
    with pytest.raises(ValidationError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=MAX_NUM_SEQS + 1)
    args = build_parser().parse_args(
        ["doctor", "--max-num-seqs", str(MAX_NUM_SEQS), "--block-size", str(BLOCK_SIZE_MAX)]
    )
    assert (args.max_num_seqs, args.block_size) == (MAX_NUM_SEQS, BLOCK_SIZE_MAX)


def test_explain_accepts_the_edges(capsys):
    # q_len 0 = prefill (variable length); dtype auto = the default.
    argv = ["explain", *CPU, "--op", "attention_prefill", "--q-len", "0", "--dtype", "auto"]
    assert main(argv) == 0
    assert "q_len 0" in capsys.readouterr().out
    assert main(["doctor", *CPU, "--dtype", "auto", "--block-size", "1"]) == 0
    assert "float32" in capsys.readouterr().out


# C4: --token-ids prompts are parsed before the model loads, errors name --prompt.


@pytest.mark.parametrize("prompt", ["1,2,x", "1,,2", "hi", "", "1,2,", "-1,2", "1.5"])
def test_generate_bad_token_id_prompt_names_prompt(prompt, capsys, no_model_load):
    argv = ["generate", "--quiet", "--token-ids", "--prompt", "5,6", f"--prompt={prompt}"]
    assert main(argv) == 2
    line = _one_line_error(capsys.readouterr().err, "--prompt")
    assert "comma-separated" in line and "invalid literal" not in line


def test_generate_token_ids_needs_a_prompt(capsys, no_model_load):
    assert main(["generate", "--quiet", "--token-ids"]) == 2
    _one_line_error(capsys.readouterr().err, "--prompt")


def test_token_id_prompts_parse():
    assert _token_id_prompts(["1,2,3", " 4 , 5 ", "6"]) == [[1, 2, 3], [4, 5], [6]]


def test_sampling_options_checked_before_the_model_loads(capsys, no_model_load):
    assert main(["generate", "--quiet", "--max-tokens", "-1"]) == 2
    _one_line_error(capsys.readouterr().err, "--max-tokens")
    assert main(["demo", "--quiet", "--top-p", "2"]) == 2
    _one_line_error(capsys.readouterr().err, "--top-p")


def test_engine_option_errors_name_the_option(capsys):
    assert main(["demo", "--quiet", "--model", "dummy:tiny", "--block-size", "0"]) == 2
    _one_line_error(capsys.readouterr().err, "--block-size")


# C5: demo --repeat (copies of the prompt set in the second wave) is at least 1.


@pytest.mark.parametrize("repeat", ["-1", "0", str(MAX_DEMO_REPEAT + 1), "two"])
def test_demo_repeat_at_least_one(repeat, capsys):
    _usage_error(capsys, ["demo", "--repeat", repeat], "--repeat")


def test_demo_repeat_accepts_the_range():
    for repeat in (1, MAX_DEMO_REPEAT):
        assert build_parser().parse_args(["demo", "--repeat", str(repeat)]).repeat == repeat
