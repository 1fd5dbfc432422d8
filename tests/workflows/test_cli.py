"""The `cai` command line: help texts, exit codes, and the constitution and model commands."""

import json
import re
import subprocess
import sys

import pytest

from workflows.cli import build_parser, main


def all_parsers(parser, path=("cai",)):
    yield path, parser
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield from all_parsers(sub, path + (name,))


def test_every_command_help_describes_each_option_once():
    seen_commands = []
    for path, parser in all_parsers(build_parser()):
        seen_commands.append(" ".join(path))
        text = parser.format_help()
        options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        for action in options:
            assert action.help and action.help.strip(), f"{path}: {action.option_strings} has no help"
            flag = action.option_strings[0]
            described = re.findall(rf"^  {re.escape(flag)}(?=[ ,=]|$)", text, flags=re.MULTILINE)
            assert len(described) == 1, f"{' '.join(path)} describes {flag} {len(described)} times"
    for expected in ["cai models tiny", "cai models default", "cai models chat", "cai constitution import",
                     "cai generate", "cai label", "cai train sft", "cai train rm", "cai train dpo", "cai eval feedback",
                     "cai constitution validate", "cai constitution show", "cai prompts check"]:
        assert expected in seen_commands


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
