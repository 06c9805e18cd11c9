"""`oci_image`: a service's OCI image layout, built by tools/images/build_image.py
from Debian packages (the base layer) and the service's py_binary runfiles
plus its pinned Python distributions (the app layer). Also writes
`<name>.digest` (sha256 of the manifest), which deploys reference."""

def _oci_image_impl(ctx):
    layout = ctx.actions.declare_directory(ctx.label.name)
    digest = ctx.actions.declare_file(ctx.label.name + ".digest")
    # The binary's launcher stub names the build machine's interpreter: the
    # image starts `python3.11 -m services.<program>` instead.
    stub = ctx.attr.binary[DefaultInfo].files_to_run.executable
    runfiles = [f for f in ctx.attr.binary[DefaultInfo].default_runfiles.files.to_list() if f != stub]
    listing = ctx.actions.declare_file(ctx.label.name + ".runfiles.tsv")
    ctx.actions.write(listing, "".join(["%s\t%s\n" % (f.short_path, f.path) for f in runfiles]))
    debs = ctx.actions.declare_file(ctx.label.name + ".debs")
    ctx.actions.write(debs, "\n".join([f.path for f in ctx.files.debs]) + "\n")
    if not ctx.files.debs:
        fail("no Debian packages for the base layer: run `make image-debs` first")
    args = ctx.actions.args()
    args.add("--program", ctx.attr.program)
    args.add("--version", ctx.attr.version)
    args.add("--debs", debs)
    args.add("--runfiles", listing)
    args.add_all(ctx.attr.packages, before_each = "--package")
    args.add("--out", layout.path)
    args.add("--digest-out", digest)
    ctx.actions.run(
        executable = ctx.executable._builder,
        arguments = [args],
        inputs = depset([listing, debs, ctx.file._requirements] + ctx.files.debs, transitive = [depset(runfiles)]),
        outputs = [layout, digest],
        mnemonic = "OciImage",
        progress_message = "Building the OCI image of %s" % ctx.attr.program,
        # It reads the pinned distributions from the project's venv (the Python
        # toolchain, outside the execroot), keyed on requirements.txt.
        execution_requirements = {"no-sandbox": "1"},
    )
    return [DefaultInfo(files = depset([layout, digest]))]

oci_image = rule(
    implementation = _oci_image_impl,
    attrs = {
        "binary": attr.label(mandatory = True, doc = "The service's py_binary."),
        "program": attr.string(mandatory = True, doc = "services/<program>; the entry point is `-m services.<program>`."),
        "packages": attr.string_list(doc = "Python distributions the service needs (their requirements come along)."),
        "version": attr.string(default = "dev"),
        "debs": attr.label(default = "@debian_packages//:debs"),
        "_requirements": attr.label(default = "//:requirements.txt", allow_single_file = True),
        "_builder": attr.label(default = "//tools/images:build_image", executable = True, cfg = "exec"),
    },
)
