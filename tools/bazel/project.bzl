"""Repository rules that bring the project's own set-up into Bazel, offline:

- `project_python`: a Python toolchain whose interpreter is the project's venv
  (`make setup` builds it from the pinned requirements.txt), so every py_test
  runs against the project's pinned packages, not the machine's Python.
- `project_model`: the default model as `make model` prepared it, for the tests
  that run it (the model comes from a PyPI wheel; Bazel fetches nothing).
"""

def _workspace_root(rctx):
    return rctx.path(Label("@//:WORKSPACE")).dirname

def _project_python_impl(rctx):
    root = _workspace_root(rctx)

    # Re-run when the pins change.
    rctx.path(Label("@//:requirements.txt"))
    python = root.get_child(".venv").get_child("bin").get_child("python3")
    if not python.exists:
        fail("no project venv at %s: run `make setup` first" % python)
    rctx.file("BUILD.bazel", content = """\
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
    # The launcher stub Bazel writes runs under the system python3, then
    # starts the program with the venv's interpreter.
    stub_shebang = "#!/usr/bin/env python3",
    visibility = ["//visibility:public"],
)

py_runtime_pair(name = "pair", py3_runtime = ":runtime")

toolchain(
    name = "toolchain",
    toolchain = ":pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
""".format(python = python))

project_python = repository_rule(implementation = _project_python_impl, local = True)

def _project_model_impl(rctx):
    model = _workspace_root(rctx).get_child(".data").get_child("models").get_child(rctx.attr.model)
    if not model.get_child("config.json").exists:
        fail("no model at %s: run `make model` first" % model)
    rctx.symlink(model, "model")
    rctx.file("BUILD.bazel", content = """\
filegroup(
    name = "model",
    srcs = glob(["model/**"]),
    visibility = ["//visibility:public"],
)

# One file of it, for a test's environment to point at.
filegroup(
    name = "config",
    srcs = ["model/config.json"],
    visibility = ["//visibility:public"],
)
""")

project_model = repository_rule(
    implementation = _project_model_impl,
    attrs = {"model": attr.string(mandatory = True)},
    local = True,
)

def _project_node_modules_impl(rctx):
    modules = _workspace_root(rctx)
    for part in rctx.attr.path.split("/"):
        modules = modules.get_child(part)
    if not modules.exists:
        fail("no %s: run `make schemas` first" % modules)
    rctx.symlink(modules, "node_modules")
    rctx.file("BUILD.bazel", content = """\
filegroup(
    name = "node_modules",
    srcs = glob(["node_modules/**"]),
    visibility = ["//visibility:public"],
)

# One file of it, for a test's environment to point at.
filegroup(
    name = "marker",
    srcs = ["node_modules/@kubernetes-models/istio/package.json"],
    visibility = ["//visibility:public"],
)
""")

project_node_modules = repository_rule(
    implementation = _project_node_modules_impl,
    attrs = {"path": attr.string(mandatory = True)},
    local = True,
)

def _project_debs_impl(rctx):
    directory = _workspace_root(rctx)
    for part in rctx.attr.path.split("/"):
        directory = directory.get_child(part)

    # Missing is not an error here: only the (manual) image targets need them,
    # and they say what to run.
    if directory.exists:
        rctx.symlink(directory, "debs")
    else:
        rctx.file("debs/.none", "")
    rctx.file("BUILD.bazel", content = """\
filegroup(
    name = "debs",
    srcs = glob(["debs/*.deb"]),
    visibility = ["//visibility:public"],
)
""")

project_debs = repository_rule(
    implementation = _project_debs_impl,
    attrs = {"path": attr.string(mandatory = True)},
    local = True,
)
