"""Every Python module a deployment file starts or loads exists, imports, and has the named attribute.

A manifest that starts `python -m services.x` or `uvicorn services.x.app:app` passes every schema check
and only fails when a pod starts. This test collects the names by parsing the deployment files:

- YAML (deploy/**, docker-compose.yml, the chart's values.yaml): `command`/`args`/`entrypoint` and
  compose healthchecks (shell strings, `bash -c` included, are split), Serve `import_path`,
  `grpc_servicer_functions`, KubeRay `serveConfigV2` (parsed as a Serve config), the chart's
  `serve.importPath` / `serve.grpcServicerFunctions`;
- Dockerfiles: CMD, ENTRYPOINT, RUN and HEALTHCHECK, exec form or shell form;
- Helm templates (not YAML until rendered): a regex over `python -m`, `uvicorn`/`gunicorn`,
  `serve run`, `import_path` and `add_*_to_server`, plus the YAML rules on the template with its
  `{{ }}` actions blanked out.

What is named: `python -m X` (X imports; a package needs X.__main__), `python -c CODE` (each module
CODE imports), `uvicorn X:attr`, Serve import paths (a Ray Serve Application or a builder), gRPC
servicer functions, console scripts in command position (this project's from pyproject.toml, others
from the installed distributions), and the config file `serve run` is given.

Importing `services.serve_app` builds the Ray Serve application object; that needs no cluster, and
the test checks Ray was not started by it.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import re
import shlex
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import yaml

# Ray's own pydantic models warn about deprecated Field arguments on import; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Using extra keyword arguments on `Field`:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = ROOT / "helm" / "avatar-forcing"

IMPORT_PATH = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?::[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)?")
MODULE = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
PYTHON = re.compile(r"python(?:\d+(?:\.\d+)?)?")
SHELLS = {"sh", "bash", "dash", "zsh", "ash"}
ASGI_SERVERS = {"uvicorn", "gunicorn", "hypercorn"}
# After one of these the next word is a command again (`a && exec b`, `tini -- b`).
COMMAND_SEPARATORS = {"&&", "||", ";", "|", "(", "exec", "--", "then", "do", "else"}
HELM_PLACEHOLDER = "__helm_action__"

# Kinds of name, and what each must satisfy (see check()).
MAIN = "python -m"  # the module exists; a package has __main__
MODULE_IMPORT = "import"  # the module imports
CALLABLE = "callable"  # module:attr or module.attr, the attribute exists and is callable
SERVE_APP = "serve import_path"  # as CALLABLE, or a ray.serve Application
CONFIG_FILE = "config file"  # a file in the repository
BAD_CODE = "python -c"  # code that does not parse


# --------------------------------------------------------------------------------------------
# Console scripts


@functools.cache
def console_scripts() -> dict[str, str]:
    """name -> "module:attr": installed distributions', then this project's own (pyproject.toml wins)."""
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    scripts.update(project.get("scripts", {}))
    return scripts


# --------------------------------------------------------------------------------------------
# Collecting: argv and shell words


def shell_words(text: str) -> list[str]:
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:  # unbalanced quotes: still look at the words
        return text.split()


def from_argv(words: list[str]) -> Iterator[tuple[str, str]]:
    """(kind, name) for each module a command line names. `words` is an exec-form argv or shell words."""
    scripts = console_scripts()
    for i, word in enumerate(words):
        command = Path(word).name
        following = words[i + 1 :]
        if i == 0 or words[i - 1] in COMMAND_SEPARATORS:
            if command in scripts:
                yield CALLABLE, scripts[command]
            if command in SHELLS:
                flag = next((j for j, w in enumerate(following) if re.fullmatch(r"-[a-z]*c[a-z]*", w)), None)
                if flag is not None and flag + 1 < len(following):
                    yield from from_argv(shell_words(following[flag + 1]))
        if PYTHON.fullmatch(command):
            options = iter(following)
            option = next(options, "")
            while option.startswith("-") and option not in ("-m", "-c"):
                option = next(options, "")
            value = next(options, None)
            if option == "-m" and value is not None:
                yield MAIN, value
            elif option == "-c" and value is not None:
                yield from from_code(value)
        if command in ASGI_SERVERS:
            app = next((w for w in following if ":" in w and IMPORT_PATH.fullmatch(w)), None)
            if app is not None:
                yield CALLABLE, app
        if command == "serve" and following[:1] and following[0] in ("run", "deploy", "build"):
            yield from serve_target(following[1:])


def serve_target(words: list[str]) -> Iterator[tuple[str, str]]:
    """What `serve run|deploy|build` is given: a config file or an import path (the first such word)."""
    target = next((w for w in words if not w.startswith("-") and (":" in w or w.endswith(".yaml"))), None)
    if target is not None and target.endswith(".yaml"):
        yield CONFIG_FILE, target
    elif target is not None and IMPORT_PATH.fullmatch(target):
        yield SERVE_APP, target


def from_code(code: str) -> Iterator[tuple[str, str]]:
    try:
        tree = ast.parse(code)
    except SyntaxError:
        yield BAD_CODE, code
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield MODULE_IMPORT, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield MODULE_IMPORT, node.module


def as_words(value) -> list[str] | None:
    """A YAML command value (list or string) as words; None when it is not a command."""
    if isinstance(value, str):
        return shell_words(value)
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    return None


# --------------------------------------------------------------------------------------------
# Collecting: YAML documents


def from_yaml(node) -> Iterator[tuple[str, str]]:
    if isinstance(node, list):
        for item in node:
            yield from from_yaml(item)
        return
    if not isinstance(node, dict):
        return
    argv: list[str] = []
    for key in ("entrypoint", "command", "args"):  # a container runs command + args
        words = as_words(node.get(key))
        if words is not None:
            argv += words
    if argv:
        yield from from_argv(argv)
    healthcheck = node.get("healthcheck")
    if isinstance(healthcheck, dict):
        test = healthcheck.get("test")
        if isinstance(test, list) and test and test[0] == "CMD":
            yield from from_argv([str(w) for w in test[1:]])
        elif isinstance(test, list) and test and test[0] == "CMD-SHELL":
            yield from from_argv(shell_words(" ".join(str(w) for w in test[1:])))
        elif isinstance(test, str):
            yield from from_argv(shell_words(test))
    for key in ("import_path", "importPath"):
        if isinstance(node.get(key), str):
            yield SERVE_APP, node[key]
    for key in ("grpc_servicer_functions", "grpcServicerFunctions"):
        for function in node.get(key) or []:
            yield CALLABLE, function
    if isinstance(node.get("serveConfigV2"), str):
        yield from from_yaml(yaml.safe_load(node["serveConfigV2"]))
    for value in node.values():
        if isinstance(value, dict | list):
            yield from from_yaml(value)


def from_yaml_text(text: str) -> Iterator[tuple[str, str]]:
    for doc in yaml.safe_load_all(text):
        yield from from_yaml(doc)


# --------------------------------------------------------------------------------------------
# Collecting: Dockerfiles and Helm templates (text)


def dockerfile_instructions(text: str) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments), with line continuations joined and comment lines dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    for line in joined.splitlines():
        match = re.match(r"\s*([A-Za-z]+)\s+(.*)$", line)
        if match:
            yield match.group(1).upper(), match.group(2).strip()


def from_dockerfile(text: str) -> Iterator[tuple[str, str]]:
    for instruction, rest in dockerfile_instructions(text):
        if instruction == "HEALTHCHECK":
            match = re.search(r"\bCMD\s+(.*)$", rest)
            if not match:
                continue
            rest = match.group(1)
        elif instruction not in ("CMD", "ENTRYPOINT", "RUN"):
            continue
        if rest.startswith("["):
            yield from from_argv([str(w) for w in json.loads(rest)])  # exec form
        else:
            yield from from_argv(shell_words(rest))  # shell form
    yield from from_text(re.sub(r"(?m)^\s*#.*$", "", text))


_SEP = r"(?:[\s\"',\[\]]|-(?=\s))+"  # between words: blanks, quotes, commas, brackets, YAML list dashes
_WORD = re.compile(r"[^\s\"',\[\]{}]+")
_PYTHON_M = re.compile(rf"\bpython(?:\d+(?:\.\d+)?)?{_SEP}-m{_SEP}([A-Za-z_][\w.]*)")
_LAUNCHER = re.compile(rf"\b(uvicorn|gunicorn|hypercorn|serve{_SEP}(?:run|deploy|build))\b")
_IMPORT_PATH_KEY = re.compile(r"\b(?:import_path|importPath)[\"']?\s*:\s*[\"']?([^\s\"',}]+)")
_SERVICER = re.compile(r"\b[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+\.add_\w+_to_server\b")


def from_text(text: str) -> Iterator[tuple[str, str]]:
    """The regex scan, for files that are not YAML (templates, Dockerfiles)."""
    for match in _PYTHON_M.finditer(text):
        yield MAIN, match.group(1)
    for match in _LAUNCHER.finditer(text):
        words = _WORD.findall(text[match.end() : match.end() + 400])[:16]
        if match.group(1).startswith("serve"):
            yield from serve_target(words)
        else:
            app = next((w for w in words if ":" in w and IMPORT_PATH.fullmatch(w)), None)
            if app is not None:
                yield CALLABLE, app
    for match in _IMPORT_PATH_KEY.finditer(text):
        if IMPORT_PATH.fullmatch(match.group(1)):
            yield SERVE_APP, match.group(1)
    for match in _SERVICER.finditer(text):
        yield CALLABLE, match.group(0)


def helm_as_yaml(text: str) -> str:
    """A template with its actions blanked: lines that are only actions go, inline ones become a placeholder."""
    text = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", text, flags=re.DOTALL)
    lines = [line for line in text.splitlines() if not re.fullmatch(r"\s*(\{\{.*?\}\}\s*)+", line)]
    return re.sub(r"\{\{.*?\}\}", HELM_PLACEHOLDER, "\n".join(lines))


def from_helm_template(text: str) -> Iterator[tuple[str, str]]:
    without_comments = re.sub(r"\{\{-?\s*/\*.*?\*/\s*-?\}\}", "", text, flags=re.DOTALL)
    yield from from_text(re.sub(r"(?m)(^|\s)#.*$", "", without_comments))
    try:
        found = list(from_yaml_text(helm_as_yaml(text)))
    except yaml.YAMLError:
        return  # not YAML even without its actions (_helpers.tpl, NOTES.txt): the regex scan covers it
    yield from ((kind, name) for kind, name in found if HELM_PLACEHOLDER not in name)


# --------------------------------------------------------------------------------------------
# The repository


def deployment_files() -> dict[str, list[Path]]:
    yaml_files = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))
    yaml_files += [ROOT / "docker-compose.yml", CHART / "values.yaml", *sorted((CHART / "files").glob("*.yaml"))]
    return {
        "yaml": yaml_files,
        "dockerfile": sorted(p for p in DEPLOY.rglob("Dockerfile*") if p.is_file()),
        "helm": sorted(p for p in (CHART / "templates").iterdir() if p.is_file()),
    }


COLLECTORS = {"yaml": from_yaml_text, "dockerfile": from_dockerfile, "helm": from_helm_template}


def collect(files: dict[str, Iterable[Path]]) -> dict[tuple[str, str], set[str]]:
    """(kind, name) -> the files that name it."""
    named: dict[tuple[str, str], set[str]] = {}
    for file_kind, paths in files.items():
        for path in paths:
            where = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
            for item in COLLECTORS[file_kind](path.read_text()):
                named.setdefault(item, set()).add(where)
    return named


@functools.cache
def repository_names() -> dict[tuple[str, str], frozenset[str]]:
    return {k: frozenset(v) for k, v in collect(deployment_files()).items()}


# --------------------------------------------------------------------------------------------
# Checking


def resolve(path: str):
    """`module:attr.sub` or `module.attr` (how Ray Serve reads import paths) -> the object."""
    if ":" in path:
        module_name, attr = path.split(":", 1)
    else:
        module_name, _, attr = path.rpartition(".")
        if not module_name:
            raise ValueError(f"{path!r} names no module")
    return functools.reduce(getattr, attr.split("."), importlib.import_module(module_name))


def check(kind: str, name: str) -> None:
    """Raises when the name does not resolve as its kind requires."""
    if kind == MODULE_IMPORT:
        importlib.import_module(name)
    elif kind == MAIN:
        if not MODULE.fullmatch(name):
            raise ValueError("not a module name")
        spec = importlib.util.find_spec(name)
        if spec is None:
            raise ModuleNotFoundError(f"no module named {name!r}")
        if spec.submodule_search_locations is not None:  # a package: importable, and runnable
            importlib.import_module(name)
            if importlib.util.find_spec(f"{name}.__main__") is None:
                raise ModuleNotFoundError(f"package {name!r} has no __main__, so `python -m` cannot run it")
    elif kind in (CALLABLE, SERVE_APP):
        if not IMPORT_PATH.fullmatch(name):
            raise ValueError("not an import path")
        target = resolve(name)
        if kind == SERVE_APP:
            from ray.serve import Application

            if not (isinstance(target, Application) or callable(target)):
                raise TypeError(f"{type(target).__name__} is neither a Serve Application nor an app builder")
        elif not callable(target):
            raise TypeError(f"{type(target).__name__} is not callable")
    elif kind == CONFIG_FILE:
        if not (ROOT / name).is_file():
            raise FileNotFoundError(name)
    elif kind == BAD_CODE:
        ast.parse(name)
        raise SyntaxError("did not parse when collected")
    else:
        raise AssertionError(f"unknown kind {kind}")


def problems(named: dict[tuple[str, str], Iterable[str]]) -> list[str]:
    found = []
    for (kind, name), where in sorted(named.items()):
        try:
            check(kind, name)
        except Exception as exc:
            found.append(f"{', '.join(sorted(where))}: {kind} {name}: {type(exc).__name__}: {exc}")
    return found


# --------------------------------------------------------------------------------------------
# Tests: the repository

SERVE_APP_PATH = "services.serve_app:app"
SERVICERS = [
    f"services._generated.avatar_forcing.v1.{module}_pb2_grpc.add_{service}Servicer_to_server"
    for module, service in (("audio_features", "AudioFeatures"), ("motion_encoder", "MotionEncoder"),
                            ("generator", "MotionGenerator"), ("decoder", "FrameDecoder"),
                            ("session", "AvatarSession"))
]  # fmt: skip


def test_the_scan_finds_the_names_each_kind_of_file_holds():
    named = repository_names()
    import_paths = {name for kind, name in named if kind in (CALLABLE, SERVE_APP, MAIN)}
    assert len(import_paths) >= 3, f"the scan found too little: {sorted(named)}"
    # The Serve application, from every file that configures it.
    serve_app = named.get((SERVE_APP, SERVE_APP_PATH), frozenset())
    for where in ("deploy/serve/config.yaml", "deploy/serve/config.cpu.yaml", "deploy/kuberay/rayservice.yaml",
                  "helm/avatar-forcing/values.yaml"):  # fmt: skip
        assert where in serve_app, f"{where}: import_path {SERVE_APP_PATH} not found"
    for servicer in SERVICERS:
        for where in ("deploy/serve/config.yaml", "deploy/kuberay/rayservice.yaml", "helm/avatar-forcing/values.yaml"):
            assert where in named.get((CALLABLE, servicer), ()), f"{where}: {servicer} not found"
    # Dockerfiles: CMD is the project's console script; RUN steps import the project.
    cli = console_scripts()["avatar-forcing"]
    for dockerfile in ("deploy/docker/Dockerfile.cpu", "deploy/docker/Dockerfile.gpu"):
        assert dockerfile in named.get((CALLABLE, cli), ()), f"{dockerfile}: CMD avatar-forcing not found"
        assert dockerfile in named.get((MODULE_IMPORT, "services"), ()), f"{dockerfile}: RUN python -c not found"
    # docker compose: ray-head's `bash -c "... exec serve run deploy/serve/config.cpu.yaml"`.
    assert "docker-compose.yml" in named.get((CONFIG_FILE, "deploy/serve/config.cpu.yaml"), ())
    assert "docker-compose.yml" in named.get((CALLABLE, console_scripts()["serve"]), ())


def test_every_named_module_imports_and_every_attribute_exists():
    import ray

    assert problems(repository_names()) == []
    assert not ray.is_initialized(), "importing the named modules must not start Ray"


def test_the_serve_import_path_is_a_serve_application():
    """Importing services.serve_app builds the application object (no cluster needed)."""
    import ray
    from ray.serve import Application

    app = resolve(SERVE_APP_PATH)
    assert isinstance(app, Application)
    assert not ray.is_initialized()


# --------------------------------------------------------------------------------------------
# Tests: the collector and the checker on synthetic files

COMPOSE_SNIPPET = """
services:
  api:
    command: ["uvicorn", "--host", "0.0.0.0", "services.nowhere:app", "--port", "8080"]
  worker:
    command: python -u -m services.nowhere
  shell:
    command: ["bash", "-c", "sleep 1 && exec python -m json.tool"]
    healthcheck:
      test: ["CMD", "python", "-c", "import services.nowhere_either"]
applications:
  - import_path: services.nowhere:app
  - import_path: json:no_such_app
"""

DOCKERFILE_SNIPPET = """\
FROM python:3.11-slim AS build
# CMD ["python", "-m", "services.in_a_comment"]
RUN pip install . \\
 && python -c "import json, services.nowhere_in_run"
CMD ["python", "-m", "services.nowhere"]
"""

TEMPLATE_SNIPPET = """\
{{- if .Values.thing.enabled }}
{{/* uvicorn services.in_a_go_comment:app */}}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "x.fullname" . }}-thing   # uvicorn services.in_a_yaml_comment:app
spec:
  template:
    spec:
      containers:
        - name: thing
          command:
            - uvicorn
            - services.nowhere:app
            - --port={{ .Values.thing.port }}
{{- end }}
"""


def _collect_snippet(tmp_path: Path, file_kind: str, name: str, text: str) -> dict[tuple[str, str], set[str]]:
    path = tmp_path / name
    path.write_text(text)
    return collect({file_kind: [path]})


def test_collector_finds_names_in_yaml(tmp_path):
    named = _collect_snippet(tmp_path, "yaml", "compose.yml", COMPOSE_SNIPPET)
    expected = {
        (CALLABLE, "services.nowhere:app"),  # uvicorn's app, after options
        (MAIN, "services.nowhere"),  # python -u -m, a command string
        (MAIN, "json.tool"),  # inside bash -c, after `&& exec`
        (MODULE_IMPORT, "services.nowhere_either"),  # a compose healthcheck's python -c
        (SERVE_APP, "services.nowhere:app"),
        (SERVE_APP, "json:no_such_app"),
    }
    assert expected <= set(named)
    # Anything else is a console script in command position (uvicorn's own, where installed).
    scripts = {(CALLABLE, entry) for entry in console_scripts().values()}
    assert set(named) - expected <= scripts
    assert all(where == {"compose.yml"} for where in named.values())


def test_checker_rejects_a_module_that_does_not_exist(tmp_path):
    reported = problems(_collect_snippet(tmp_path, "yaml", "compose.yml", COMPOSE_SNIPPET))
    joined = "\n".join(reported)
    assert f"{SERVE_APP} services.nowhere:app: ModuleNotFoundError" in joined
    assert f"{CALLABLE} services.nowhere:app: ModuleNotFoundError" in joined
    assert f"{MAIN} services.nowhere: ModuleNotFoundError" in joined
    assert f"{MODULE_IMPORT} services.nowhere_either: ModuleNotFoundError" in joined
    assert f"{SERVE_APP} json:no_such_app: AttributeError" in joined
    assert "json.tool" not in joined, "a module that exists was reported"
    assert len(reported) == 5


def test_checker_requires_a_runnable_module_a_callable_and_an_existing_file():
    assert problems({(MAIN, "email"): ["x"]}), "the email package has no __main__: `python -m email` fails"
    assert problems({(CALLABLE, "json:__doc__"): ["x"]}), "a string is not a callable entry point"
    assert problems({(CONFIG_FILE, "deploy/serve/nowhere.yaml"): ["x"]})
    assert problems({(BAD_CODE, "import ("): ["x"]})
    good = {(MAIN, "venv"), (MAIN, "json.tool"), (CALLABLE, "json:dumps"), (CALLABLE, "json.dumps"),
            (CONFIG_FILE, "deploy/serve/config.yaml")}  # fmt: skip
    assert problems({key: ["x"] for key in good}) == []


def test_collector_finds_names_in_a_dockerfile(tmp_path):
    named = _collect_snippet(tmp_path, "dockerfile", "Dockerfile", DOCKERFILE_SNIPPET)
    assert (MAIN, "services.nowhere") in named
    assert (MODULE_IMPORT, "services.nowhere_in_run") in named
    assert (MODULE_IMPORT, "json") in named
    assert not [name for _, name in named if "in_a_comment" in name], "comments name nothing"
    assert f"{MAIN} services.nowhere: ModuleNotFoundError" in "\n".join(problems(named))


def test_collector_finds_names_in_a_helm_template(tmp_path):
    named = _collect_snippet(tmp_path, "helm", "thing.yaml", TEMPLATE_SNIPPET)
    assert named[(CALLABLE, "services.nowhere:app")] == {"thing.yaml"}
    assert not [name for _, name in named if "comment" in name], "comments name nothing"
    assert not [name for _, name in named if HELM_PLACEHOLDER in name]
    assert problems(named)
