"""The `cai` command line: help texts, exit codes, and the constitution and model commands."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import config_help, config_options
from workflows.cli.main import main
from workflows.cli.registry import COMMANDS, command_names

ROOT = Path(__file__).resolve().parents[3]


def help_text(capsys, words) -> str:
    with pytest.raises(SystemExit) as info:
        main([*words, "--help"])
    assert info.value.code == 0
    return capsys.readouterr().out


def option_lines(text: str) -> list[tuple[str, str]]:
    """(flag, its help) for each option line of a help text; help may start on the next line."""
    lines, found = text.splitlines(), []
    for i, line in enumerate(lines):
        match = re.match(r"^  (-[-\w]+)(.*)$", line)
        if match and match.group(1) not in ("-h", "--help"):
            rest = re.sub(r"^[^ ]*( [A-Z_.\[\]{},|-]+)*(, -[-\w]+( [A-Z_.\[\]]+)*)*", "", match.group(2)).strip()
            following = lines[i + 1].strip() if i + 1 < len(lines) and lines[i + 1].startswith("    ") else ""
            found.append((match.group(1), rest or following))
    return found


def test_every_registered_command_has_help_describing_each_option_once(capsys):
    assert {"generate", "label", "train", "eval", "submit", "run", "status"} <= command_names()
    for command in COMMANDS:
        text = help_text(capsys, command.words)
        flags = option_lines(text)
        assert flags or command.words in {("models", "tiny"), ("constitution", "validate"), ("status",)} or \
            not command.words, f"cai {' '.join(command.words)} lists no options"
        for flag, described in flags:
            assert described, f"cai {' '.join(command.words)}: {flag} has no help"
        names = [flag for flag, _ in flags]
        assert len(names) == len(set(names)), f"cai {' '.join(command.words)} describes an option twice"
        if command.config is not None:  # a job's flags are its config's fields, each once
            positional = {name for name, f in config_options(command.config).items() if f.metadata["positional"]}
            assert {n.lstrip("-").replace("-", "_") for n in names} >= set(config_help(command.config)) - \
                {name for name in config_help(command.config) if is_group(command.config, name)} - positional


def is_group(cls, name: str) -> bool:
    """A nested config field (its fields are the flags, not itself)."""
    import dataclasses
    import typing

    for path_cls in [cls, *[h for h in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(h)]]:
        hint = typing.get_type_hints(path_cls).get(name)
        if hint is not None:
            return dataclasses.is_dataclass(hint)
    return False


def test_help_runs_from_the_console_script():
    result = subprocess.run([sys.executable, "-m", "workflows.cli", "constitution", "import", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--from {anthropic,llm-swarm}" in result.stdout


def test_validate_prints_summary_or_errors(tmp_path, capsys):
    assert main(["constitution", "validate", "harmless"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["valid"] and summary["critiques"] >= 12 and len(summary["sha256"]) == 64
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: '1'\ndescription: ''\ncritiques: []\nfeedback: [{id: a}]\n")
    assert main(["constitution", "validate", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "feedback[0] (id 'a'): missing key 'text'" in err


def test_show_prints_principles(capsys):
    assert main(["constitution", "show", "helpful_honest"]) == 0
    out = capsys.readouterr().out
    assert "Critique/revision principles" in out and "Feedback principles" in out


def test_import_llm_swarm_then_validate(tmp_path, capsys):
    source = tmp_path / "constitution.json"
    source.write_text(json.dumps({
        "constitutions": [{"critic": "Point out harm.", "revision": "Remove the harm."}],
        "system_chat": [[
            {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "Point out harm."}, {"role": "assistant", "content": "c"},
            {"role": "user", "content": "Remove the harm."}, {"role": "assistant", "content": "r"},
        ]],
    }))
    out = tmp_path / "swarm.yaml"
    assert main(["constitution", "import", "--from", "llm-swarm", str(source), "--out", str(out)]) == 0
    written = json.loads(capsys.readouterr().out)
    assert main(["constitution", "validate", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == written["sha256"]


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["models", "chat", "--model", str(tmp_path / "missing"), "hello"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cai: error: model directory") and "Traceback" not in err
    assert main(["prompts", "check", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["constitution", "import", "--from", "anthropic", "--out", str(tmp_path / "x.yaml")]) == 2
    assert "needs --critiques" in capsys.readouterr().err


def test_models_tiny_command_writes_a_model(tmp_path, capsys):
    assert main(["models", "tiny", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert (tmp_path / "m" / "model.safetensors").exists()
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"], ["constitution", "validate", "--help"]])
def test_help_exits_zero(argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0


HH = ["\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: A joke?\n\nAssistant: No.", "Assistant: first", "\n\nHuman: alone",
      "Assistant: again"]


def test_prompts_check_reports_column_rejects_by_reason_and_the_first_prompt(tmp_path, capsys):
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps({"chosen": text, "rejected": text}) + "\n" for text in HH))
    assert main(["prompts", "check", str(path), "--prompt-column", "rejected"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["column"], report["format"]) == ("rejected", "transcript")
    assert (report["rows"], report["usable"], report["rejected"]) == (4, 1, 3)
    assert report["rejects_by_reason"][0] == {
        "reason": "'rejected' does not start with a 'Human:' turn", "count": 2, "rows": [1, 3],
        "example": "'rejected' does not start with a 'Human:' turn (starts with 'Assistant: first')"}
    assert report["rejects_by_reason"][1]["reason"] == "'rejected' has no 'Assistant:' turn to cut"
    assert report["first_prompt"]["messages"] == [{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello!"},
                                                  {"role": "user", "content": "A joke?"}]


def test_prompts_check_reads_a_hub_dataset_offline_from_the_hub_cache(hub_cache):
    env = hub_cache("acme/red-team", {"data/train-00000-of-00001.parquet": [{"transcript": HH[0]}],
                                      "data/test-00000-of-00001.parquet": [{"transcript": t} for t in HH[1:]]})
    check = [sys.executable, "-m", "workflows.cli", "prompts", "check", "hf:acme/red-team"]  # this checkout's code
    result = subprocess.run([*check, "--prompt-split", "test"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert (report["source"], report["split"], report["column"]) == ("hf:acme/red-team", "test", "transcript")
    assert (report["rows"], report["usable"], report["first_prompt"]) == (3, 0, None)
    assert [r["reason"] for r in report["rejects_by_reason"]] == [
        "'transcript' does not start with a 'Human:' turn", "'transcript' has no 'Assistant:' turn to cut"]
