"""Repository-level contracts: the documented commands, the test devices, the CLI and the config registry."""

import dataclasses
import json
import pathlib
import re
import subprocess
import sys

import jax
import pytest

import configs
from jaxvla import cli

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def setup_commands(readme: str) -> list[str]:
    """The fenced bash blocks of README's "Set-up" section, one string each."""
    section = readme.split("\n## Set-up\n", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)]


def test_readme_has_two_one_line_setup_commands_and_ci_runs_the_test_one():
    commands = setup_commands((REPO_ROOT / "README.md").read_text())
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    main_job, tests = commands
    assert main_job.endswith(".venv/bin/jaxvla demo")
    assert tests.endswith(".venv/bin/python -m pytest -q")
    ci_lines = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci_lines


# Linked from the README before they exist: the lead's branch of issue 22 adds them.
PENDING_DOCS = {"docs/deploy.md"}


def markdown_links(text: str) -> list[str]:
    """The relative link targets in markdown text, without their #anchors."""
    return [t for t in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if "://" not in t]


def test_readme_stays_the_front_door_and_lists_every_doc():
    readme = (REPO_ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250  # details go to docs/, linked from "## Docs"
    listed = set(markdown_links(readme.split("\n## Docs\n", 1)[1]))
    on_disk = {p.relative_to(REPO_ROOT).as_posix() for p in (REPO_ROOT / "docs").glob("*.md")}
    assert on_disk <= listed, f"docs not linked from the README: {sorted(on_disk - listed)}"


@pytest.mark.parametrize(
    "doc", ["README.md", *sorted(f"docs/{p.name}" for p in (REPO_ROOT / "docs").glob("*.md"))]
)
def test_every_relative_link_resolves(doc):
    path = REPO_ROOT / doc
    for target in markdown_links(path.read_text()):
        resolved = (path.parent / target).resolve()
        pending = resolved.relative_to(REPO_ROOT).as_posix() in PENDING_DOCS
        assert resolved.exists() or pending, f"{doc} links to {target}, which does not exist"


@pytest.mark.parametrize("command", [("check", "."), ("format", "--check", ".")], ids=["lint", "format"])
def test_ruff_finds_nothing_to_fix(command):
    """CI runs ruff: its rules and its format (pyproject.toml) hold over the whole tree."""
    done = subprocess.run(
        [sys.executable, "-m", "ruff", *command], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:]


def test_no_statement_is_exempt_from_the_formatter():
    markers = ("fmt: " + "skip", "fmt: " + "off")  # split, so this file does not carry them
    folders = ("configs", "envs", "examples", "jaxvla", "learner", "tests", "tools")
    exempt = [
        path.relative_to(REPO_ROOT).as_posix()
        for folder in folders
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        if any(marker in path.read_text() for marker in markers)
    ]
    assert not exempt


def test_conftest_gives_four_cpu_devices():
    assert jax.device_count() == 4
    assert {device.platform for device in jax.devices()} == {"cpu"}


def test_the_files_started_first_are_test_files():
    from conftest import LONGEST_FIRST

    # A renamed file would silently fall back to the end of the queue.
    assert all((REPO_ROOT / "tests" / name).is_file() for name in LONGEST_FIRST)
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)


def test_cli_imports_only_the_standard_library():
    # A fresh interpreter: this one already has jax loaded by conftest.
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import jaxvla.cli\n"
        "loaded = {name.partition('.')[0] for name in set(sys.modules) - before}\n"
        "print(json.dumps(sorted(loaded - set(sys.stdlib_module_names) - {'jaxvla'})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(result.stdout) == []


def test_cli_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.SUBCOMMANDS)


def test_cli_without_a_command_prints_the_list_and_fails(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in cli.SUBCOMMANDS)


def test_cli_unknown_command_suggests_the_closest(capsys):
    assert cli.main(["bnech"]) == 2
    assert "did you mean 'bench'?" in capsys.readouterr().err


def test_cli_passes_remaining_args_and_returns_the_exit_code(tmp_path, monkeypatch):
    (tmp_path / "fake_subcommand.py").write_text(
        "def main(argv):\n    return 7 if argv == ['a', '-b'] else 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "sim", ("fake_subcommand", "fake"))
    assert cli.main(["sim", "a", "-b"]) == 7


def test_cli_missing_third_party_module_asks_for_the_learner_extra(monkeypatch, capsys):
    monkeypatch.setitem(cli.SUBCOMMANDS, "sim", ("no_such_third_party_package", "fake"))
    assert cli.main(["sim"]) == 2
    assert capsys.readouterr().err == (
        "jaxvla sim needs 'no_such_third_party_package' from the learner extras: pip install -e "
        "'.[learner]' in a checkout of the repository\n"
    )


def test_cli_hints_at_a_module_that_a_command_imports_only_when_it_runs(tmp_path, monkeypatch, capsys):
    # `jaxvla actor` imports mujoco only for `--robot twin`, inside main(), after the module loaded.
    (tmp_path / "late_import_command.py").write_text(
        "def main(argv):\n    import no_such_third_party_package\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.SUBCOMMANDS, "sim", ("late_import_command", "fake"))
    assert cli.main(["sim"]) == 2
    err = capsys.readouterr().err
    assert "needs 'no_such_third_party_package' from the learner extras" in err and err.count("\n") == 1


WITHOUT_PACKAGE = """
import importlib.abc, sys
class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] == {package!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Missing())
from jaxvla import cli
sys.exit(cli.main({argv!r}))
"""


def cli_without(package: str, *argv: str) -> subprocess.CompletedProcess:
    """`jaxvla ARGV` in a fresh interpreter where importing `package` fails, as if it were not installed."""
    script = WITHOUT_PACKAGE.format(package=package, argv=list(argv))
    return subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True)


def test_jaxvla_actor_without_mujoco_says_what_to_install_in_one_line():
    result = cli_without("mujoco", "actor", "--robot-id", "robot-0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("jaxvla actor needs 'mujoco' from the learner extras: pip install -e")


def test_a_learner_command_without_the_checkout_says_how_to_install_it_in_one_line():
    # What `pip install jaxvla` (the robot wheel, `jaxvla` alone) gives: the learner side is not there.
    result = cli_without("tools", "demo")
    assert result.returncode == 2
    assert result.stderr == (
        "jaxvla demo runs from a checkout of the repository ('tools' is not installed: the jaxvla wheel "
        "is the robot client alone): pip install -e '.[learner]' in the checkout\n"
    )


@pytest.mark.parametrize("module", ["jaxvla.no_such_module", "tools.no_such_module"])
def test_cli_missing_first_party_module_is_raised(monkeypatch, module):
    monkeypatch.setitem(cli.SUBCOMMANDS, "sim", (module, "fake"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["sim"])


def test_registry_lookup():
    assert {"default", "debug"} <= set(configs.list_configs())
    assert configs.get_config("default").env.num_envs == 256
    assert configs.get_config("debug").env.num_envs == 4
    assert all(configs.get_config(name).name == name for name in configs.list_configs())


def test_unknown_config_suggests_the_closest():
    with pytest.raises(KeyError, match="did you mean 'debug'"):
        configs.get_config("debgu")


def test_duplicate_config_names_are_rejected():
    config = configs.get_config("debug")
    with pytest.raises(ValueError, match="debug"):
        configs.index_by_name([config, config])


def test_configs_are_frozen():
    config = configs.get_config("debug")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.env.num_envs = 8  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.name = "other"  # type: ignore[misc]


def test_bad_split_is_rejected():
    with pytest.raises(ValueError, match="split"):
        configs.TargetConfig(split="test")  # type: ignore[arg-type]


def test_cli_overrides_a_nested_field():
    config = configs.cli(["debug", "--env.num-envs", "8"])
    assert config == dataclasses.replace(
        configs.get_config("debug"), env=dataclasses.replace(configs.get_config("debug").env, num_envs=8)
    )


def test_cli_rejects_an_unknown_split():
    with pytest.raises(SystemExit):
        configs.cli(["debug", "--target.split", "test"])


def test_the_target_section_alone_names_the_prior_task_split_seeds_and_test_contexts():
    """One place per setting, so `--target.task sort` moves patching, Recap, RIPT, PRO and the fleet
    together. Pretraining has no target: it makes the prior, over every task in `pretrain.tasks`, and its
    `eval_episodes` are its periodic evaluations'."""
    shared = {"prior", "task", "split", "seeds", "eval_episodes"}
    assert shared == {field.name for field in dataclasses.fields(configs.TargetConfig)}
    for section in configs.SECTIONS:
        if section in ("target", "pretrain"):
            continue
        names = {field.name for field in dataclasses.fields(getattr(configs.get_config("debug"), section))}
        assert not names & shared, section
    config = configs.cli(["debug", "--target.task", "sort", "--target.seeds", "4"])
    assert (config.target.task, config.target.seeds) == ("sort", (4,))


def command_sections() -> dict[str, tuple[str, ...]]:
    """The sections each command that starts from a prior reads."""
    from tools import patch
    from tools import pro
    from tools import recap
    from tools import ript
    from tools import serve

    return {
        "patch": patch.SECTIONS,
        "pro": pro.SECTIONS,
        "recap": recap.SECTIONS,
        "ript": ript.SECTIONS,
        "serve": serve.SECTIONS,
    }


@pytest.mark.parametrize("command", ["patch", "pro", "recap", "ript", "serve"])
def test_a_command_that_takes_its_model_from_the_prior_rejects_model_flags(command):
    sections = command_sections()[command]
    assert "model" not in sections
    with pytest.raises(SystemExit, match="the model comes from the prior"):
        configs.cli(["debug", "--model.width", "8"], f"jaxvla {command}", sections)
    with pytest.raises(SystemExit, match="does not read the demo section"):
        configs.cli(["debug", "--demo.robots=2"], f"jaxvla {command}", sections)


def test_a_command_help_lists_only_the_sections_it_reads(capsys):
    with pytest.raises(SystemExit):
        configs.cli(["debug", "--help"], "jaxvla recap", command_sections()["recap"])
    text = capsys.readouterr().out
    for read in ("--target.prior", "--recap.iterations", "--operator.slip", "--out-dir"):
        assert read in text
    for unread in ("--model.", "--patch.", "--sac.", "--fleet.", "--ript.", "--demo."):
        assert unread not in text
    assert "--name" not in text  # the config's name is the positional choice


def test_a_command_parse_keeps_the_named_config_in_the_sections_it_does_not_read():
    config = configs.cli(["demo", "--patch.rounds", "5"], "jaxvla patch", ("target", "patch"))
    demo = configs.get_config("demo")
    assert config == dataclasses.replace(demo, patch=dataclasses.replace(demo.patch, rounds=5))
