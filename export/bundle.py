"""``latentlink export bundle``: one .tar.gz with everything a Jetson Nano needs to run the edge of one profile.

The archive unpacks into ``latentlink/`` (``sudo tar -xzf FILE -C /opt`` gives ``/opt/latentlink``)::

    README.txt                 the exact commands, on the workstation and on the Nano
    setup.sh                   apt packages, a venv over JetPack's Python 3.6, pins, the wheel, `export check`,
                               the TensorRT engine (engine cache), the systemd unit, an optional benchmark
    run-edge.sh                runs the edge with the bundle's profile and engine: what the service starts
    latentlink-edge.service    the systemd unit (Restart=always), settings in /etc/latentlink/edge.env
    edge.env.example           those settings' template (the host's address, the camera)
    bundle.env                 what the scripts need to know: profile, encoder, precision, wheel, version
    SHA256SUMS                 setup.sh refuses files that differ
    wheels/latentlink-<version>-py3-none-any.whl   built from this checkout with `pip wheel --no-deps`
    profile/<profile>.yaml     the profile, its model paths rewritten to model/
    profile/model/             its ONNX files and model.json

The scripts and the unit are plain files in ``export/bundle_files/``. The archive is reproducible: entries in name
order, owner root, fixed times (the wheel's too, through SOURCE_DATE_EPOCH), gzip without a time stamp; two bundles
of the same checkout and profile are byte-identical.

Runs on the workstation (needs a checkout of latentlink, since it builds the wheel from setup.py, and pip).
"""

import gzip
import io
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile

import yaml

from latentlink.edge.backends.base import file_sha256
from latentlink.edge.errors import ConfigError, LatentlinkError
from latentlink.edge.profile import load_profile, resolve_profile_path

TOP = "latentlink"  # the archive's one top folder, and the install folder's name (/opt/latentlink)
FIXED_TIME = 315532800  # 1980-01-01 00:00 UTC: zip's earliest date, so the wheel's entries get it too
EXECUTABLES = ("setup.sh", "run-edge.sh")
STATIC_FILES = ("setup.sh", "run-edge.sh", "latentlink-edge.service", "edge.env.example")
# What setup.py packages (package_dir): copied to a scratch folder so the build leaves the checkout as it is.
PACKAGE_SOURCES = ("setup.py", "README.md", "latentlink", "edge", "host", "export", "profiles")


def check_out_path(out):
    """ConfigError unless ``out`` ends in .tar.gz and its folder can be written."""
    from latentlink.edge.cli import check_output_file

    if not out.endswith(".tar.gz"):
        raise ConfigError("--out {}: the bundle is a gzipped tar; give a name ending in .tar.gz, e.g. --out "
                          "latentlink-nano-504.tar.gz".format(out))
    check_output_file("--out", out)


def find_checkout(checkout=None):
    """The latentlink checkout to build the wheel from: ``checkout``, else the one this code runs from, else the
    current folder. ConfigError if none has setup.py and export/bundle_files/."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # export/.. in a checkout
    candidates = [checkout] if checkout else [here, os.getcwd()]
    for folder in candidates:
        if os.path.isfile(os.path.join(folder, "setup.py")) and os.path.isdir(
                os.path.join(folder, "export", "bundle_files")):
            return os.path.abspath(folder)
    raise ConfigError("{} is not a checkout of latentlink (no setup.py and export/bundle_files/); the bundle's wheel "
                      "is built from one: run this from a checkout, or pass --checkout DIR".format(
                          " or ".join(candidates)))


def build_wheel(checkout, out_dir, log=print):
    """``pip wheel --no-deps`` of ``checkout`` into ``out_dir``; returns the wheel's path. The sources are copied
    to a scratch folder first (pip would leave build/ and *.egg-info in the checkout); SOURCE_DATE_EPOCH fixes the
    times inside the wheel, so the same sources give the same bytes."""
    scratch = tempfile.mkdtemp(prefix="latentlink-wheel-")
    try:
        # Named "latentlink": setuptools fails on a project folder called "src".
        staged = os.path.join(scratch, "latentlink")
        os.mkdir(staged)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.engine", "*.engine.json", "*.tmp", "bundle_files")
        for name in PACKAGE_SOURCES:
            source = os.path.join(checkout, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(staged, name), ignore=ignore)
            else:
                shutil.copy2(source, staged)
        command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", out_dir, staged]
        if _can_build_wheels_here():  # else pip fetches setuptools into a build environment of its own
            command.insert(5, "--no-build-isolation")
        log("building the wheel: " + " ".join(command[2:]))
        result = subprocess.run(command, env=dict(os.environ, SOURCE_DATE_EPOCH=str(FIXED_TIME)),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        if result.returncode:
            raise LatentlinkError("pip wheel failed (exit status {}):\n{}".format(
                result.returncode, result.stdout.strip()[-3000:]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    wheels = sorted(name for name in os.listdir(out_dir) if name.endswith(".whl"))
    if len(wheels) != 1 or not wheels[0].endswith("-py3-none-any.whl"):
        raise LatentlinkError("pip wheel made {} in {}, not one pure-Python latentlink wheel".format(wheels, out_dir))
    return os.path.join(out_dir, wheels[0])


def _can_build_wheels_here():
    """Whether this environment's setuptools can build a wheel: its own bdist_wheel (setuptools >= 70.1), or the
    wheel package's."""
    for module in ("setuptools.command.bdist_wheel", "wheel.bdist_wheel"):
        try:
            __import__(module)
            return True
        except ImportError:
            continue
    return False


def model_files(profile):
    """{role: (ONNX path, metadata path)} for the profile's encoder and decoder; ConfigError naming the fix when a
    file is missing."""
    files = {}
    for role in ("encoder", "decoder"):
        path = getattr(profile.model, role)
        if not os.path.isfile(path):
            raise ConfigError("profile {} names the {} {}, which does not exist; export the model with `latentlink "
                              "export onnx --checkpoint CHECKPOINT --profile {} --out {}`".format(
                                  profile.name, role, path, profile.name, os.path.dirname(path)))
        meta = path + ".json"
        if not os.path.isfile(meta):
            meta = os.path.join(os.path.dirname(path), "model.json")
        if not os.path.isfile(meta):
            raise ConfigError("{} has no model.json beside it (its input shape and latent packing); `latentlink "
                              "export onnx` writes it: export the model again".format(path))
        files[role] = (path, meta)
    return files


def check_encoder(encoder, check_args, log=print):
    """Run ``latentlink export check ENCODER CHECK_ARGS`` (the same command line, so its options apply); returns a
    sentence for bundle.env. ConfigError when the check fails; skipped (and said so) without the onnx package."""
    from .__main__ import _main as export_main

    try:
        import onnx  # noqa: F401
    except ImportError:
        log("note: the onnx package is not installed, so `latentlink export check` is skipped "
            "(pip install onnx, or the [export] extra)")
        return "not checked (no onnx package where it was built)"
    argv = ["check", encoder] + shlex.split(check_args)
    if export_main(argv) != 0:
        raise ConfigError("`latentlink export {}` failed (above): the Nano's TensorRT would not build this "
                          "encoder; fix the model, or pass --skip-check to bundle it anyway".format(" ".join(argv)))
    return "passed: latentlink export check {}{}".format(
        os.path.basename(encoder), " " + check_args if check_args else "")


def write_profile(source_path, dest_path, model_paths):
    """The profile YAML with its model paths replaced by ``model_paths`` ({role: path relative to the profile})."""
    with io.open(source_path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    data["model"] = dict(data.get("model") or {}, **model_paths)
    header = ("# Written by `latentlink export bundle` from {}; the model paths point into the bundle\n"
              "# (relative to this file). The original's comments are in the latentlink repository.\n").format(
                  os.path.basename(source_path))
    with io.open(dest_path, "w", encoding="utf-8") as f:
        f.write(header + yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1000))


def _is_shipped(name, path):
    """Whether profile ``name`` is the shipped one at ``path`` (so a host finds it by name)."""
    try:
        return os.path.samefile(resolve_profile_path(name), path)
    except (ConfigError, OSError):
        return False


def _shell_assignments(values):
    return "".join("{}={}\n".format(key, shlex.quote(str(value))) for key, value in values)


def _git_commit(checkout):
    try:
        out = subprocess.run(["git", "-C", checkout, "describe", "--always", "--dirty", "--abbrev=12"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def write_tar(folder, out):
    """``folder``'s files as a reproducible .tar.gz at ``out`` (written to a temporary name, then renamed)."""
    def normalized(info):
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = FIXED_TIME
        executable = info.isdir() or os.path.basename(info.name) in EXECUTABLES
        info.mode = 0o755 if executable else 0o644
        return info

    paths = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in dirs + files:
            paths.append(os.path.join(root, name))
    tmp = out + ".tmp"
    try:
        folder_out = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(folder_out):
            os.makedirs(folder_out)
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as zipped, \
                tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(folder, arcname=TOP, recursive=False, filter=normalized)
            for path in sorted(paths, key=lambda p: os.path.relpath(p, folder)):
                tar.add(path, arcname=TOP + "/" + os.path.relpath(path, folder).replace(os.sep, "/"),
                        recursive=False, filter=normalized)
        os.replace(tmp, out)
    except (OSError, IOError) as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ConfigError("cannot write {} ({}); give --out a path in a folder you can write".format(
            out, exc.strerror or exc))


def build_bundle(profile_name, out, checkout=None, check=True, check_args="", log=print):
    """Write the bundle for ``profile_name`` (a name or a YAML path) to ``out`` (.tar.gz); returns a summary dict:
    ``out``, ``bytes``, ``files`` (paths inside the archive), ``wheel``, ``version``, ``checked``."""
    check_out_path(out)
    profile_path = resolve_profile_path(profile_name)
    profile = load_profile(profile_path)
    models = model_files(profile)
    checkout = find_checkout(checkout)
    checked = check_encoder(models["encoder"][0], check_args, log) if check else "not checked (--skip-check)"

    scratch = tempfile.mkdtemp(prefix="latentlink-bundle-")
    try:
        root = os.path.join(scratch, TOP)
        for sub in ("wheels", "profile/model"):
            os.makedirs(os.path.join(root, sub))
        wheel = build_wheel(checkout, os.path.join(root, "wheels"), log)
        version = os.path.basename(wheel).split("-")[1]

        # The model: one folder when encoder and decoder share one (with its model.json), else one each.
        shared = os.path.dirname(models["encoder"][0]) == os.path.dirname(models["decoder"][0])
        model_paths = {}
        for role, (onnx_path, meta_path) in sorted(models.items()):
            folder = "model" if shared else "model/" + role
            os.makedirs(os.path.join(root, "profile", folder), exist_ok=True)
            shutil.copyfile(onnx_path, os.path.join(root, "profile", folder, os.path.basename(onnx_path)))
            shutil.copyfile(meta_path, os.path.join(root, "profile", folder, os.path.basename(meta_path)))
            model_paths[role] = folder + "/" + os.path.basename(onnx_path)
        profile_file = "profile/" + os.path.basename(profile_path)
        write_profile(profile_path, os.path.join(root, profile_file), model_paths)
        load_profile(os.path.join(root, profile_file))  # the rewritten profile must still be valid

        files_dir = os.path.join(checkout, "export", "bundle_files")
        for name in STATIC_FILES:
            shutil.copyfile(os.path.join(files_dir, name), os.path.join(root, name))
        bundle_name = os.path.basename(out)
        wheel_file = "wheels/" + os.path.basename(wheel)
        with io.open(os.path.join(files_dir, "README.txt"), encoding="utf-8") as f:
            readme = f.read()
        host_profile = profile.name if _is_shipped(profile.name, profile_path) else TOP + "/" + profile_file
        for key, value in (("@PROFILE_FILE@", profile_file), ("@PROFILE@", profile.name), ("@VERSION@", version),
                           ("@WHEEL@", wheel_file), ("@BUNDLE@", bundle_name), ("@HOST_PROFILE@", host_profile)):
            readme = readme.replace(key, value)
        with io.open(os.path.join(root, "README.txt"), "w", encoding="utf-8") as f:
            f.write(readme)
        with io.open(os.path.join(root, "bundle.env"), "w", encoding="utf-8") as f:
            f.write("# What this bundle holds; read by setup.sh and run-edge.sh (paths relative to this folder).\n")
            f.write(_shell_assignments([
                ("BUNDLE_NAME", bundle_name), ("BUNDLE_PROFILE_NAME", profile.name),
                ("BUNDLE_PROFILE", profile_file), ("BUNDLE_ENCODER", "profile/" + model_paths["encoder"]),
                ("BUNDLE_PRECISION", profile.precision), ("BUNDLE_VERSION", version), ("BUNDLE_WHEEL", wheel_file),
                ("BUNDLE_CHECK_ARGS", check_args), ("BUNDLE_CHECKED", checked),
                ("BUNDLE_COMMIT", _git_commit(checkout))]))

        files = []
        for folder, dirs, names in os.walk(root):
            files.extend(os.path.relpath(os.path.join(folder, n), root).replace(os.sep, "/") for n in names)
        files.sort()
        with io.open(os.path.join(root, "SHA256SUMS"), "w", encoding="utf-8") as f:
            f.write("".join("{}  {}\n".format(file_sha256(os.path.join(root, name)), name) for name in files))
        write_tar(root, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"out": out, "bytes": os.path.getsize(out), "files": sorted(files + ["SHA256SUMS"]),
            "wheel": wheel_file, "version": version, "checked": checked, "profile": profile.name}
