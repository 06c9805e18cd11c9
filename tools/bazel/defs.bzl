"""`pytest_test`: one py_test per test module, run by pytest with the
project's conftest.py and pytest settings (pyproject.toml)."""

def pytest_test(name, src, deps = [], data = [], size = "small", tags = [], env = {}):
    native.py_test(
        name = name,
        srcs = [src, "//tools/bazel:pytest_main.py"],
        main = "//tools/bazel:pytest_main.py",
        args = ["$(rootpath %s)" % src],
        python_version = "PY3",
        deps = deps + ["//:pytest_config"],
        data = data,
        size = size,
        tags = tags,
        env = env,
    )

def pytest_tests(srcs, deps = [], data = [], size = "small", tags = {}, sizes = {}, env = {}):
    """A pytest_test per file of `srcs`; `tags` and `sizes` by file name."""
    for src in srcs:
        pytest_test(
            name = src[:-len(".py")],
            src = src,
            deps = deps,
            data = data,
            size = sizes.get(src, size),
            tags = tags.get(src, []),
            env = env,
        )
