import re


def quick_start_commands(readme: str) -> list[str]:
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_has_two_quick_start_commands_and_ci_runs_the_second(repo):
    commands = quick_start_commands((repo / "README.md").read_text())
    assert len(commands) == 2
    assert "dpoflow run demo" in commands[0]
    ci = (repo / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci
