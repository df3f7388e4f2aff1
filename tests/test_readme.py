"""README's line links, [`name`](file.py#Lnn), must land on the line that defines `name` (its def
or class, methods included), so that an edit above a function cannot leave the walk-through
pointing at other code."""
import ast
import os
import re
import runpy

from conftest import REPO

LINE_LINK = re.compile(r"\[([^\]]*)\]\(([^)#\s]+\.py)#L(\d+)\)")


def definitions(source):
    """{name: {line, ...}} for every def and class, under its bare name and its dotted path
    (MixAndMatchCVAE.sampling)."""
    lines = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                for name in (child.name, prefix + child.name):
                    lines.setdefault(name, set()).add(child.lineno)  # the def line, below any decorator
                visit(child, prefix + child.name + ".")
    visit(ast.parse(source), "")
    return lines


def stale_links(readme, read):
    """What is wrong with the line links of `readme`, reading each linked file with read(path),
    which returns its text or None; and how many links there are."""
    problems, links = [], LINE_LINK.findall(readme)
    for text, path, line in links:
        name = re.fullmatch(r"`([\w.]+)`", text)
        source = read(path)
        if name is None:
            problems.append(f"[{text}]({path}#L{line}): a line link names its def or class, as [`name`]")
        elif source is None:
            problems.append(f"[{text}]({path}#L{line}): there is no {path}")
        else:
            found = sorted(definitions(source).get(name.group(1), ()))
            if int(line) not in found:
                where = ", ".join(f"L{n}" for n in found) or "nowhere in it"
                problems.append(f"[{text}]({path}#L{line}): {name.group(1)} is defined at {where}")
    return problems, len(links)


def read_repo_file(path):
    full = os.path.join(REPO, path)
    return open(full, encoding="utf-8").read() if os.path.isfile(full) else None


def readme():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_line_links_land_on_their_definitions():
    problems, n_links = stale_links(readme(), read_repo_file)
    assert problems == []
    assert n_links >= 15  # the walk-through's links were all read


def test_the_check_fails_on_a_moved_function_a_missing_file_and_a_line_past_the_end():
    def model_one_line_down(path):  # as if a line were added at the top of model.py
        source = read_repo_file(path)
        return "\n" + source if path == "model.py" else source

    problems, _ = stale_links(readme(), model_one_line_down)
    assert problems and all("](model.py#L" in problem for problem in problems)
    assert any(re.search(r"split_image is defined at L\d+", problem) for problem in problems)

    problems, _ = stale_links("[`main`](nothere.py#L1) [`main`](train.py#L99999) [main](train.py#L1)",
                              read_repo_file)
    assert problems[0].endswith("there is no nothere.py")
    assert re.search(r"main is defined at L\d+$", problems[1])
    assert problems[2].endswith("a line link names its def or class, as [`name`]")


def test_the_own_model_example_runs_as_written(tmp_path):
    """README's "Mix-and-Match in your own model" block, run as a reader would paste it into a file."""
    section = readme().split("## Mix-and-Match in your own model", 1)[1]
    (tmp_path / "example.py").write_text(section.split("```python\n", 1)[1].split("```", 1)[0], encoding="utf-8")
    namespace = runpy.run_path(str(tmp_path / "example.py"))  # its own assert checks the shape it promises
    assert namespace["h_z"].shape == (8, 128) and len(namespace["future"]) == 25
