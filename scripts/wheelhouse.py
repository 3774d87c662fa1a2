#!/usr/bin/env python3
"""Offline install of vLLM (and friends) on an air-gapped GPU host.

Three steps, each a sub-command:

  build   (machine with internet) resolve what the requested packages need on the target host,
          given the host's Python version, platform and `pip list --format=freeze`; keep every
          package the host already has at the host's version; leave out the excluded optional
          kernels; download each remaining wheel with --no-deps; write manifest.json.
  split   tar the wheels + manifest into pieces of at most --piece-mib MiB (parts/wheels.tar.partNN)
          for a transfer tool that carries ~58 MiB per call; `join` is the inverse.
  install (on the host) verify every wheel's sha256 against the manifest, refuse any wheel that
          would replace an installed package at another version (torch above all), install with
          `pip install --no-index --no-deps`, then check `import vllm` and that torch is unchanged.

Commands used for the H100 host (glibc 2.39, Python 3.12.3, torch 2.11.0+cu130):

  python3 scripts/wheelhouse.py build --host-packages scripts/hosts/h100-py312-torch2.11.txt \
      --python-version 3.12 --platform manylinux_2_39_x86_64 --out .wheelhouse vllm==0.26.0
  python3 scripts/wheelhouse.py split .wheelhouse --piece-mib 55
  # on the host, after carrying .wheelhouse/parts/* over:
  python3 scripts/wheelhouse.py join PARTS_DIR --out /root/wheelhouse
  python3 scripts/wheelhouse.py install /root/wheelhouse --python python3

For the H200 session (bench/h200_session.sh prepare): `build --strip vllm:MEMBER_GLOB` leaves
binaries out of vLLM's wheel that it imports inside try/except (FA2, the MoE kernels, the Rust
frontend: 179 MiB of its 290), `--extra FILE` carries a file with the wheels (the SmolLM2 registry
wheel), `split` writes the extras and the smallest wheels first, and `join --partial` extracts what
the pieces carried so far hold whole, so that work can start before the last piece arrives.

Platforms.  pip takes `--platform` tags literally (it does not widen manylinux_2_N to older glibc
levels), so `build` widens each manylinux_2_N_ARCH it is given to every manylinux_2_M_ARCH with
17 <= M <= N plus the legacy manylinux2014/2010/1 aliases, the way pip on the host itself accepts
them.  Give the host's glibc level: with only manylinux_2_28_x86_64 the build fails, because
llguidance 1.7.x (which vLLM 0.26.0 pins to <1.8) ships x86_64 wheels for manylinux_2_31 only.
The host reports glibc 2.39 (Ubuntu 24.04), hence manylinux_2_39_x86_64.

Why not let pip resolve the whole closure.  Run strictly (`pip install --dry-run --report` with the
host list as constraints) it fails: vLLM 0.26.0 pins numba==0.65.0 while the host has 0.68.0, and
also pins setuptools<81 (host 81.0.0), apache-tvm-ffi==0.1.10 (xgrammar 0.2.8, also a vLLM
dependency, needs >=0.1.11), flashinfer-python==0.6.14; mistral_common needs numpy<2.4 (host
2.5.2).  The host's versions must win (they are what torch and the rest of the host were built
with, and the previous hand-made install ran fine with them), so `build` walks the metadata itself:
it asks pip (`--dry-run --no-deps --report`, one call per level, PEP 658 metadata where the index
has it) for the best version of each needed package under the combined specifiers collected so
far, evaluates environment markers for the *target* (pip would evaluate them for the interpreter
running it), stops at host packages (recording any requirement the host version does not meet),
at EXCLUDED packages and below NO_DEPS packages, applies PINS, and repeats until no choice
changes.  Every host version a requirement disagrees with is listed in manifest.json under
"host_kept" with "satisfied": false, so the pins vLLM states and the versions actually used are
visible side by side.

Comparison with the known-good hand-made list (/work/shared/gpu-host-wheels.txt, 87 wheels) for
vllm==0.26.0 on this host: see the comment after the tables below (`build --compare FILE` prints
the live comparison).

Dependencies: stdlib + pip.  `install`, `split` and `join` use only the stdlib and run pip as a
subprocess.  `build` also needs the `packaging` library for PEP 508 markers and PEP 440 specifiers;
it uses the standalone one if importable and otherwise the copy pip vendors (pip._vendor.packaging),
so nothing beyond pip has to be installed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
from pathlib import Path

# --------------------------------------------------------------------------------------------
# The three explicit tables.  Names are PEP 503-normalised (lower case, '-' separators).
# --------------------------------------------------------------------------------------------

# Heavy optional kernels left out by default: vLLM imports them lazily (only for the models,
# quantisations or attention back-ends that use them), and the previous install served a
# Qwen2-shaped 7B with LoRA without any of them.  Override with --include NAME (take it back in)
# or --exclude NAME (leave out one more).
EXCLUDED = {
    "flashinfer-cubin": "precompiled flashinfer kernels (large); flashinfer JIT-compiles what it needs",
    "flashinfer-jit-cache": "precompiled flashinfer kernels (large); flashinfer JIT-compiles what it needs",
    "tilelang": "optional kernel DSL (vLLM pin); not needed to serve (known-good install lacked it)",
    "nvidia-cutlass-dsl": "CuTe DSL kernels (vLLM and flashinfer dependency); not needed to serve",
    "nvidia-cutlass-dsl-libs-base": "part of nvidia-cutlass-dsl",
    "nvidia-cutlass-dsl-libs-cu13": "part of nvidia-cutlass-dsl[cu13]",
    "quack-kernels": "optional CuTe-DSL kernels; not needed to serve",
    "humming-kernels": "optional kernels (vLLM pin); not needed to serve",
    "pynvvideocodec": "video decoding for multimodal inputs; not on the text serving path",
    "torchcodec": "audio/video decoding for multimodal inputs; not on the text serving path",
    "tokenspeed-mla": "MLA attention kernels (DeepSeek-style models only); not in the known-good install",
    "fastsafetensors": "optional GPU-direct safetensors loader (--load-format fastsafetensors); "
                       "not in the known-good install",
    "nvidia-cudnn-frontend": "cuDNN front end for optional flashinfer/cuDNN attention paths; "
                             "not in the known-good install",
    "cuda-tile": "CUDA tile kernels, a flashinfer dependency skipped by --no-deps anyway",
}

# Versions that replace what the dependency metadata asks for (the metadata's specifier for that
# package is ignored and recorded in the manifest).
PINS = {
    # xgrammar 0.2.8 requires apache-tvm-ffi>=0.1.11 while vLLM 0.26.0 pins ==0.1.10 (the brief
    # remembered 0.1.9); the two cannot both hold.  0.1.11 ran on the host with vLLM.
    "apache-tvm-ffi": "0.1.11",
    # vLLM 0.26.0 pins flashinfer-python==0.6.14; 0.6.13 is the measured known-good one (the
    # sampler only imports it at start).  Use --pin flashinfer-python==0.6.14 to follow vLLM.
    "flashinfer-python": "0.6.13",
}

# Installed without their dependencies: their requirements are not followed.
NO_DEPS = {
    # flashinfer-python wants cuda-tile[tileiras], nvidia-cutlass-dsl, nvidia-cudnn-frontend
    # (heavy, optional); vLLM's sampler only needs `import flashinfer` to work.
    "flashinfer-python": "optional heavy kernel dependencies; `import flashinfer` works without them",
}

# Differences from the hand-made known-good list /work/shared/gpu-host-wheels.txt (87 wheels),
# measured with `build ... --platform manylinux_2_39_x86_64 --compare FILE vllm==0.26.0`:
# the same 87 package names; five versions are newer releases that came out after that list was
# made, because `build` takes the newest version the specifiers allow:
#   anthropic 2.12.0 -> 2.14.0, cachetools 8.0.1 -> 8.0.2, openai 3.54.0 -> 3.57.0,
#   pydantic 2.14.3 -> 2.14.4 with pydantic-core 2.50.4 -> 2.50.5 (pydantic pins its core).
# Not yet run on the host.  To reproduce the reference exactly add `--pin anthropic==2.12.0
# --pin cachetools==8.0.1 --pin openai==3.54.0 --pin pydantic==2.14.3 --pin pydantic-core==2.50.4`.
# Everything else matches, including the PINS above and jsonschema / referencing /
# jsonschema-specifications / rpds-py (needed by vLLM and mistral_common, absent from the host).
# vLLM requirements left out (EXCLUDED hits): fastsafetensors, humming-kernels,
# nvidia-cudnn-frontend, nvidia-cutlass-dsl, pynvvideocodec, quack-kernels, tilelang,
# tokenspeed-mla, torchcodec (none in the reference either).  The host keeps numba 0.68.0 (vLLM
# pins 0.65.0), numpy 2.5.2 (mistral_common wants <2.4) and setuptools 81.0.0 (vLLM wants <81),
# as the known-good install did.

# --------------------------------------------------------------------------------------------


class WheelhouseError(Exception):
    """An error reported as one line: what and why."""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_FREEZE_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;#]+)\s*$")


def parse_host_list(text: str, source: str = "host list") -> dict[str, str]:
    """`pip list --format=freeze` / `pip freeze` text -> {normalised name: version}."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith("-e "):
            continue
        m = _FREEZE_LINE.match(line)
        if m:
            out[norm(m.group(1))] = m.group(2)
            continue
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)\s*@\s*\S+", line)
        if m:  # direct-URL install: present, version unknown
            out[norm(m.group(1))] = ""
            continue
        raise WheelhouseError(f"{source} line {n}: not 'name==version': {line!r}")
    if not out:
        raise WheelhouseError(f"{source}: no packages in it")
    return out


def read_host_list(path: str) -> tuple[dict[str, str], str]:
    p = Path(path)
    if not p.is_file():
        raise WheelhouseError(f"host list not found: {path} (write it on the host with "
                              f"`python3 -m pip list --format=freeze > FILE`)")
    data = p.read_bytes()
    return parse_host_list(data.decode(), str(path)), hashlib.sha256(data).hexdigest()


def version_key(v: str) -> tuple:
    """Stdlib-only comparison key good enough to tell 'same version' (install side):
    local label dropped, trailing zero release parts trimmed, case folded."""
    v = v.strip().lower().lstrip("v").split("+", 1)[0]
    m = re.match(r"^(\d+(?:\.\d+)*)(.*)$", v)
    if not m:
        return (v,)
    rel = [int(x) for x in m.group(1).split(".")]
    while len(rel) > 1 and rel[-1] == 0:
        rel.pop()
    return (tuple(rel), m.group(2).replace("-", "").replace("_", "").replace(".", ""))


def same_version(a: str, b: str) -> bool:
    return version_key(a) == version_key(b)


def parse_wheel_filename(filename: str) -> tuple[str, str]:
    if not filename.endswith(".whl"):
        raise WheelhouseError(f"{filename}: not a wheel file name")
    parts = filename[:-4].split("-")
    if len(parts) not in (5, 6):
        raise WheelhouseError(f"{filename}: not a valid wheel file name")
    return norm(parts[0]), parts[1]


# --------------------------------------------------------------------------------------------
# Platforms
# --------------------------------------------------------------------------------------------

_ARCHES = "x86_64|aarch64|ppc64le|s390x|i686|armv7l"
_PLATFORM_RE = re.compile(rf"^(?:manylinux_2_(\d+)|manylinux2014|manylinux2010|manylinux1|"
                          rf"musllinux_1_\d+|linux)_({_ARCHES})$")
_LEGACY = {"manylinux2014": 17, "manylinux2010": 12, "manylinux1": 5}


def expand_platforms(platforms: list[str]) -> list[str]:
    """Validate Linux platform tags; widen manylinux ones to every older glibc level."""
    out: list[str] = []
    for p in platforms:
        m = _PLATFORM_RE.match(p)
        if not m:
            raise WheelhouseError(f"unknown platform {p!r} (expected e.g. manylinux_2_39_x86_64, "
                                  f"manylinux2014_x86_64 or linux_x86_64)")
        arch = m.group(2)
        glibc = int(m.group(1)) if m.group(1) else next(
            (g for k, g in _LEGACY.items() if p.startswith(k + "_")), None)
        tags = [p]
        if glibc is not None:
            tags = [f"manylinux_2_{g}_{arch}" for g in range(glibc, 4, -1)]
            tags += [f"{k}_{arch}" for k, g in _LEGACY.items() if g <= glibc]
        out += [t for t in tags if t not in out]
    return out


def platform_arch(platforms: list[str]) -> str:
    arches = {_PLATFORM_RE.match(p).group(2) for p in platforms}
    if len(arches) != 1:
        raise WheelhouseError(f"platforms name several architectures: {sorted(arches)}")
    return arches.pop()


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------

def _packaging():
    try:
        from packaging.markers import Marker  # noqa: F401
        import packaging.requirements as req
        import packaging.version as ver
    except ImportError:
        import pip._vendor.packaging.requirements as req  # type: ignore
        import pip._vendor.packaging.version as ver  # type: ignore
    return req.Requirement, ver.Version


def target_environment(python_version: str, arch: str) -> dict[str, str]:
    if not re.match(r"^3\.\d+(\.\d+)?$", python_version):
        raise WheelhouseError(f"python version {python_version!r}: expected e.g. 3.12")
    short = ".".join(python_version.split(".")[:2])
    full = python_version if python_version.count(".") == 2 else short + ".0"
    return {
        "python_version": short, "python_full_version": full, "implementation_version": full,
        "implementation_name": "cpython", "platform_python_implementation": "CPython",
        "os_name": "posix", "sys_platform": "linux", "platform_system": "Linux",
        "platform_machine": arch, "platform_release": "", "platform_version": "", "extra": "",
    }


def _pip_target_args(python_version: str, platforms: list[str]) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python_version,
            "--implementation", "cp"]
    for p in platforms:
        args += ["--platform", p]
    return args


def pip_pick(pip: list[str], reqs: list[str], python_version: str, platforms: list[str]) -> dict:
    """Best wheel for each requirement (no dependencies) -> {name: report item}."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = pip + ["install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet",
                     "--target", str(Path(tmp) / "t"), "--report", str(report)]
        cmd += _pip_target_args(python_version, platforms) + reqs
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            missing = re.findall(r"No matching distribution found for (\S+)", r.stderr)
            last = [l for l in r.stderr.splitlines() if l.startswith("ERROR")]
            if last:  # pip lists every version; keep the last few
                last[0] = re.sub(r"\(from versions: (?:[^,)]*, )*?((?:[^,)]+, ){0,3}[^,)]+)\)",
                                 r"(newest versions: \1)", last[0])
            if missing:
                raise WheelhouseError(
                    f"no wheel for {missing[0]} on cp{python_version.replace('.', '')} "
                    f"{platforms[0]} (or older): {last[0] if last else ''}".rstrip(": "))
            raise WheelhouseError(f"pip could not pick {' '.join(reqs)}: "
                                  f"{last[-1] if last else r.stderr.strip()[-300:]}")
        items = json.loads(report.read_text())["install"]
    return {norm(i["metadata"]["name"]): i for i in items}


def resolve(requested: list[str], host: dict[str, str], python_version: str,
            platforms: list[str], excluded: dict[str, str], pins: dict[str, str],
            no_deps: dict[str, str], pip: list[str], picker=None, log=print) -> dict:
    """Walk the dependency metadata from `requested` for the target; see the module docstring.

    picker(reqs) -> {name: pip report item}; defaults to pip_pick (tests pass a fake)."""
    Requirement, Version = _packaging()
    env = target_environment(python_version, platform_arch(platforms))
    picker = picker or (lambda reqs: pip_pick(pip, reqs, python_version, platforms))
    roots = [Requirement(r) for r in requested]
    chosen: dict[str, dict] = {}
    for round_no in range(1, 50):
        need: dict[str, dict] = {}
        host_kept: dict[str, dict] = {}
        excl_hits: dict[str, set] = {}
        pin_overrides: dict[str, set] = {}
        expanded: set = set()
        stack = [(r, "(requested)") for r in roots]
        while stack:
            req, parent = stack.pop()
            name = norm(req.name)
            if name in excluded:
                excl_hits.setdefault(name, set()).add(parent)
                continue
            if name in host:
                hv = host[name]
                ok = (not str(req.specifier)) or (
                    hv != "" and req.specifier.contains(Version(hv), prereleases=True))
                e = host_kept.setdefault(name, {"host_version": hv, "required": {},
                                                "satisfied": True})
                e["required"][parent] = str(req.specifier) or "any"
                e["satisfied"] = e["satisfied"] and ok
                continue
            n = need.setdefault(name, {"spec": None, "extras": set(), "by": set()})
            if name in pins:
                if str(req.specifier):
                    pin_overrides.setdefault(name, set()).add(f"{parent}: {req.specifier}")
            else:
                n["spec"] = req.specifier if n["spec"] is None else n["spec"] & req.specifier
            n["extras"] |= set(req.extras)
            n["by"].add(parent)
            c = chosen.get(name)
            if c is None or name in no_deps:
                continue
            for extra in [""] + sorted(req.extras):
                if (name, extra) in expanded:
                    continue
                expanded.add((name, extra))
                for d in c["metadata"].get("requires_dist") or []:
                    dr = Requirement(d)
                    if dr.marker is None:
                        if extra == "":
                            stack.append((dr, f"{name} {c['metadata']['version']}"))
                    elif dr.marker.evaluate(dict(env, extra=extra)) and (
                            extra == "" or not dr.marker.evaluate(dict(env, extra=""))):
                        stack.append((dr, f"{name} {c['metadata']['version']}"))
        todo = {}
        for name, n in need.items():
            want = f"{name}=={pins[name]}" if name in pins else f"{name}{n['spec'] or ''}"
            c = chosen.get(name)
            if c is not None and c["want"] == want:
                continue
            if c is not None and name not in pins and n["spec"] is not None and \
                    n["spec"].contains(Version(c["metadata"]["version"]), prereleases=True):
                c["want"] = want
                continue
            todo[name] = want
        if not todo:
            break
        log(f"round {round_no}: picking {len(todo)} package(s)")
        picked = picker(sorted(todo.values()))
        for name, want in todo.items():
            if name not in picked:
                raise WheelhouseError(f"pip returned no wheel for {want}")
            chosen[name] = dict(picked[name], want=want)
    else:
        raise WheelhouseError("dependency walk did not settle after 50 rounds")
    wheels = []
    for name in sorted(need):
        c = chosen[name]
        info = c.get("download_info") or {}
        url = info.get("url", "")
        wheels.append({
            "name": name, "version": c["metadata"]["version"],
            "file": urllib.parse.unquote(url.rsplit("/", 1)[-1]),
            "index_sha256": ((info.get("archive_info") or {}).get("hashes") or {}).get("sha256"),
            "required_by": sorted(need[name]["by"]),
            **({"pinned": pins[name]} if name in pins else {}),
            **({"no_deps": no_deps[name]} if name in no_deps else {}),
        })
    return {
        "wheels": wheels,
        "excluded": [{"name": k, "reason": excluded[k], "required_by": sorted(v)}
                     for k, v in sorted(excl_hits.items())],
        "host_kept": [{"name": k, **{kk: (dict(sorted(vv.items())) if kk == "required" else vv)
                                     for kk, vv in v.items()}}
                      for k, v in sorted(host_kept.items())],
        "pin_overrides": [{"name": k, "pinned": pins[k], "ignored": sorted(v)}
                          for k, v in sorted(pin_overrides.items())],
    }


def parse_strips(specs: list[str]) -> dict[str, list[str]]:
    """['vllm:vllm/x.so', ...] -> {'vllm': ['vllm/x.so', ...]} (patterns are fnmatch globs)."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, pattern = spec.partition(":")
        if not sep or not name or not pattern:
            raise WheelhouseError(f"--strip {spec!r}: expected PACKAGE:MEMBER_GLOB")
        out.setdefault(norm(name), []).append(pattern)
    return out


def strip_wheel(src: Path, dst: Path, patterns: list[str]) -> list[str]:
    """Copy wheel src to dst without the members matching any pattern (and their RECORD lines).
    For kernels the package imports inside try/except (vLLM's FA2 and MoE extensions): the
    transfer to the host is the bottleneck, not the install."""
    import fnmatch
    import zipfile
    removed = []
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zout:
        names = zin.namelist()
        drop = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
        if not drop:
            raise WheelhouseError(f"{src.name}: no member matches {patterns}")
        for info in zin.infolist():
            if info.filename in drop:
                removed.append(info.filename)
                continue
            data = zin.read(info.filename)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if line.split(",", 1)[0] not in drop).encode()
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED if info.compress_type else zipfile.ZIP_STORED)
    return sorted(removed)


def cmd_build(a) -> int:
    host, host_hash = read_host_list(a.host_packages)
    platforms = expand_platforms(a.platform)
    excluded = dict(EXCLUDED)
    for x in a.exclude:
        excluded[norm(x)] = "excluded on the command line"
    for x in a.include:
        excluded.pop(norm(x), None)
    pins = dict(PINS)
    for p in a.pin:
        if "==" not in p:
            raise WheelhouseError(f"--pin {p!r}: expected NAME==VERSION")
        k, v = p.split("==", 1)
        pins[norm(k)] = v
    no_deps = {k: v for k, v in NO_DEPS.items() if norm(k) not in map(norm, a.with_deps)}
    pip = [a.pip_python, "-m", "pip"]
    for r in a.packages:
        if norm(re.split(r"[\[<>=!~; ]", r, 1)[0]) in host:
            print(f"note: {r} is already on the host; the host version is kept", file=sys.stderr)
    res = resolve(a.packages, host, a.python_version, platforms, excluded, pins, no_deps, pip,
                  log=lambda m: print(m, file=sys.stderr))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = {w["file"] for w in res["wheels"]}
    for old in out.glob("*.whl.orig"):  # a stripped wheel's download: the original comes back first
        old.replace(out / old.name.removesuffix(".orig"))
    for old in out.glob("*.whl"):
        if old.name not in wanted:
            old.unlink()
    todo = [w for w in res["wheels"] if not (out / w["file"]).is_file()]
    if todo:
        print(f"downloading {len(todo)} wheel(s) into {out}", file=sys.stderr)
        cmd = pip + ["download", "--no-deps", "--quiet", "-d", str(out)]
        cmd += _pip_target_args(a.python_version, platforms)
        cmd += [f"{w['name']}=={w['version']}" for w in todo]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = [l for l in r.stderr.splitlines() if l.startswith("ERROR")]
            raise WheelhouseError(f"pip download failed: {last[-1] if last else r.stderr[-300:]}")
    total = 0
    for w in res["wheels"]:
        f = out / w["file"]
        if not f.is_file():
            raise WheelhouseError(f"{w['name']} {w['version']}: wheel {w['file']} missing after "
                                  f"download (no wheel for the target platform?)")
        w["sha256"], w["size"] = sha256_of(f), f.stat().st_size
        if w.pop("index_sha256") not in (None, w["sha256"]):
            raise WheelhouseError(f"{w['file']}: checksum mismatch with the index")
    strips = parse_strips(a.strip)
    for w in res["wheels"]:
        if w["name"] in strips:
            f = out / w["file"]
            original = f.with_name(f.name + ".orig")
            f.replace(original)
            removed = strip_wheel(original, f, strips[w["name"]])
            w["stripped"] = {"members": removed, "original_sha256": w["sha256"], "original_size": w["size"],
                             "patterns": strips[w["name"]]}
            w["sha256"], w["size"] = sha256_of(f), f.stat().st_size
            print(f"stripped {w['file']}: {len(removed)} member(s), "
                  f"{(w['stripped']['original_size'] - w['size']) / 2**20:.1f} MiB less", file=sys.stderr)
    missing = sorted(set(strips) - {w["name"] for w in res["wheels"]})
    if missing:
        raise WheelhouseError(f"--strip names packages not in the wheelhouse: {', '.join(missing)}")
    total = sum(w["size"] for w in res["wheels"])
    extras = []
    for path in a.extra:
        src = Path(path)
        if not src.is_file():
            raise WheelhouseError(f"--extra {path}: not a file")
        if src.resolve() != (out / src.name).resolve():
            (out / src.name).write_bytes(src.read_bytes())
        extras.append({"file": src.name, "sha256": sha256_of(out / src.name), "size": src.stat().st_size})
    manifest = {
        "format": 1,
        "requested": a.packages,
        "target": {"python_version": a.python_version, "platforms": a.platform,
                   "platform_tags": platforms},
        "host_list": {"path": a.host_packages, "sha256": host_hash, "packages": len(host)},
        "install": "pip install --no-index --no-deps (scripts/wheelhouse.py install)",
        "total_bytes": total,
        **res,
        # Files carried with the wheels but not installed (e.g. a model's registry wheel).
        "extras": extras,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"{len(res['wheels'])} wheels, {total / 2**20:.1f} MiB in {out}; "
          f"{len(res['excluded'])} excluded; manifest {out / 'manifest.json'}")
    bad = [h for h in res["host_kept"] if not h["satisfied"]]
    for h in bad:
        print(f"  host keeps {h['name']} {h['host_version']} although "
              + "; ".join(f"{k} wants {v}" for k, v in h["required"].items()))
    if a.compare:
        compare(res["wheels"], a.compare)
    return 0


def compare(wheels: list[dict], path: str) -> None:
    ref = parse_host_list(Path(path).read_text(), path)
    mine = {w["name"]: w["version"] for w in wheels}
    print(f"compared with {path} ({len(ref)} wheels):")
    for n in sorted(set(ref) | set(mine)):
        if n not in mine:
            print(f"  only in reference: {n}=={ref[n]}")
        elif n not in ref:
            print(f"  only here:         {n}=={mine[n]}")
        elif not same_version(ref[n], mine[n]):
            print(f"  version differs:   {n} reference {ref[n]}, here {mine[n]}")


# --------------------------------------------------------------------------------------------
# split / join
# --------------------------------------------------------------------------------------------

class _PieceWriter:
    """A write-only file that rolls over to a new piece every `size` bytes."""

    def __init__(self, folder: Path, stem: str, size: int):
        self.folder, self.stem, self.size = folder, stem, size
        self.paths: list[Path] = []
        self._f = None
        self._left = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._left == 0:
                if self._f:
                    self._f.close()
                p = self.folder / f"{self.stem}.part{len(self.paths):02d}"
                self.paths.append(p)
                self._f, self._left = open(p, "wb"), self.size
            n = min(self._left, len(view))
            self._f.write(view[:n])
            self._left -= n
            view = view[n:]
        return len(data)

    def close(self):
        if self._f:
            self._f.close()


def split(folder: str, piece_bytes: int) -> list[Path]:
    src = Path(folder)
    man = src / "manifest.json"
    if not man.is_file():
        raise WheelhouseError(f"{man}: not found (run build first)")
    manifest = json.loads(man.read_text())
    if piece_bytes < 10240:
        raise WheelhouseError(f"piece size {piece_bytes} bytes: too small")
    parts = src / "parts"
    parts.mkdir(exist_ok=True)
    for old in parts.glob("wheels.tar.part*"):
        old.unlink()
    # Smallest first and the extras before the wheels: `join --partial` on the first pieces
    # already gives the small packages (and a carried model) while the large wheels travel.
    names = (["manifest.json"] + [e["file"] for e in manifest.get("extras", [])]
             + [w["file"] for w in sorted(manifest["wheels"], key=lambda w: (w["size"], w["file"]))])
    for n in names:
        if not (src / n).is_file():
            raise WheelhouseError(f"{src / n}: listed in the manifest but missing")
    w = _PieceWriter(parts, "wheels.tar", piece_bytes)
    with tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for n in names:
            info = tar.gettarinfo(str(src / n), arcname=n)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            with open(src / n, "rb") as f:
                tar.addfile(info, f)
    w.close()
    return w.paths


class _JoinedReader:
    def __init__(self, paths: list[Path]):
        self._paths = list(paths)
        self._f = None

    def read(self, n: int = -1) -> bytes:
        out = b""
        while n < 0 or len(out) < n:
            if self._f is None:
                if not self._paths:
                    break
                self._f = open(self._paths.pop(0), "rb")
            chunk = self._f.read(-1 if n < 0 else n - len(out))
            if not chunk:
                self._f.close()
                self._f = None
                continue
            out += chunk
        return out


def join(parts_dir: str, out_dir: str, partial: bool = False) -> list[str]:
    """Extract the pieces' tar. partial: from the pieces 0..k present so far, every member that
    they hold whole (the rest once the next pieces are there)."""
    d = Path(parts_dir)
    if not d.is_dir():
        raise WheelhouseError(f"{parts_dir}: not a folder")
    paths = sorted(d.glob("wheels.tar.part*"), key=lambda p: int(p.name.rsplit("part", 1)[1]))
    if not paths:
        raise WheelhouseError(f"{parts_dir}: no wheels.tar.partNN pieces in it")
    nums = [int(p.name.rsplit("part", 1)[1]) for p in paths]
    if partial:
        run = next((i for i, n in enumerate(nums) if n != i), len(nums))
        paths, nums = paths[:run], nums[:run]
        if not paths:
            raise WheelhouseError(f"{parts_dir}: no wheels.tar.part00 yet")
        return _join_partial(paths, Path(out_dir))
    if nums != list(range(len(nums))):
        missing = sorted(set(range(max(nums) + 1)) - set(nums))
        raise WheelhouseError(f"{parts_dir}: piece(s) missing: "
                              + ", ".join(f"wheels.tar.part{m:02d}" for m in missing))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    try:
        with tarfile.open(fileobj=_JoinedReader(paths), mode="r|") as tar:
            for m in tar:
                if not m.isfile() or "/" in m.name or m.name.startswith("."):
                    raise WheelhouseError(f"{m.name}: unexpected entry in the wheelhouse tar")
                src = tar.extractfile(m)
                with open(out / m.name, "wb") as f:
                    while block := src.read(1 << 20):
                        f.write(block)
                names.append(m.name)
    except tarfile.ReadError as e:
        raise WheelhouseError(f"{parts_dir}: pieces do not form a complete tar ({e})") from None
    if "manifest.json" not in names:
        raise WheelhouseError(f"{parts_dir}: no manifest.json in the pieces")
    return names


def _join_partial(paths: list[Path], out: Path) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    names = []
    try:
        with tarfile.open(fileobj=_JoinedReader(paths), mode="r|") as tar:
            for m in tar:
                if not m.isfile() or "/" in m.name or m.name.startswith("."):
                    raise WheelhouseError(f"{m.name}: unexpected entry in the wheelhouse tar")
                target = out / m.name
                if target.is_file() and target.stat().st_size == m.size:
                    names.append(m.name)  # written by an earlier partial join
                    continue
                src = tar.extractfile(m)
                tmp = target.with_name(target.name + ".part")
                with open(tmp, "wb") as f:
                    while block := src.read(1 << 20):
                        f.write(block)
                if tmp.stat().st_size != m.size:  # cut by the last piece present
                    tmp.unlink()
                    break
                tmp.replace(target)
                names.append(m.name)
    except (tarfile.ReadError, EOFError):
        pass  # the stream ends inside a member or a header: what came before is whole
    for tmp in out.glob("*.part"):
        tmp.unlink()
    return names


# --------------------------------------------------------------------------------------------
# install (stdlib + pip only)
# --------------------------------------------------------------------------------------------

def check_wheels(folder: Path, manifest: dict, installed: dict[str, str]) -> tuple[list, list]:
    """Verify checksums and refuse replacements -> (wheels to install, wheels already present)."""
    todo, present = [], []
    for w in manifest["wheels"]:
        f = folder / w["file"]
        if not f.is_file():
            raise WheelhouseError(f"{w['file']}: listed in the manifest but missing from {folder}")
        if f.stat().st_size != w["size"] or sha256_of(f) != w["sha256"]:
            raise WheelhouseError(f"{w['file']}: checksum mismatch with manifest.json "
                                  f"(corrupt or altered; carry it again)")
        name, version = parse_wheel_filename(w["file"])
        have = installed.get(name)
        if have is None:
            todo.append(w)
        elif same_version(have, version):
            present.append(w)
        else:
            extra = " (torch must never be replaced)" if name in ("torch", "torchvision",
                                                                   "torchaudio", "triton") else ""
            raise WheelhouseError(f"refusing: wheel {w['file']} would replace installed "
                                  f"{name} {have} with {version}{extra}")
    return todo, present


def _run_py(python: str, code: str) -> str:
    r = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise WheelhouseError(f"{python} -c {code!r} failed: {tail}")
    return r.stdout.strip()


def installed_packages(python: str) -> dict[str, str]:
    r = subprocess.run([python, "-m", "pip", "list", "--format=freeze"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise WheelhouseError(f"{python} -m pip list failed: {r.stderr.strip()[-200:]}")
    return parse_host_list(r.stdout, f"{python} -m pip list")


def cmd_install(a) -> int:
    folder = Path(a.folder)
    man = folder / "manifest.json"
    if not man.is_file():
        raise WheelhouseError(f"{man}: not found (join the pieces first)")
    manifest = json.loads(man.read_text())
    installed = installed_packages(a.python)
    todo, present = check_wheels(folder, manifest, installed)
    freeze_hash = hashlib.sha256(subprocess.run(
        [a.python, "-m", "pip", "list", "--format=freeze"], capture_output=True).stdout).hexdigest()
    if freeze_hash != manifest["host_list"]["sha256"]:
        print("note: this host's package list differs from the one the wheelhouse was built for; "
              "installed versions were checked above", file=sys.stderr)
    for w in present:
        print(f"already installed: {w['name']} {w['version']}")
    torch_before = _run_py(a.python, "import torch; print(torch.__version__)") \
        if "torch" in installed else None
    if a.check_only:
        print(f"check passed: {len(todo)} wheel(s) would be installed")
        return 0
    if todo:
        cmd = [a.python, "-m", "pip", "install", "--no-index", "--no-deps",
               "--disable-pip-version-check"] + [str(folder / w["file"]) for w in todo]
        r = subprocess.run(cmd)
        if r.returncode != 0:
            raise WheelhouseError(f"pip install --no-index --no-deps failed (exit {r.returncode})")
    after = installed_packages(a.python)
    changed = [f"{n} {installed[n]} -> {after.get(n, '(removed)')}" for n in installed
               if not same_version(installed[n], after.get(n, "?"))]
    if changed:
        raise WheelhouseError("installed packages changed: " + "; ".join(changed))
    if torch_before is not None:
        torch_after = _run_py(a.python, "import torch; print(torch.__version__)")
        if torch_after != torch_before:
            raise WheelhouseError(f"torch changed: {torch_before} -> {torch_after}")
        print(f"torch unchanged: {torch_after}")
    for w in todo:
        print(f"installed: {w['name']} {w['version']}")
    if any(norm(r).startswith("vllm") for r in manifest["requested"]) and not a.no_import_check:
        print("import vllm:", _run_py(a.python, "import vllm; print(vllm.__version__)"))
    print(f"{len(todo)} installed, {len(present)} already present")
    return 0


# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="resolve and download the wheels (needs the index)")
    b.add_argument("packages", nargs="+", help="requirements, e.g. vllm==0.26.0")
    b.add_argument("--host-packages", required=True, help="the host's pip list --format=freeze")
    b.add_argument("--python-version", required=True, help="the host's Python, e.g. 3.12")
    b.add_argument("--platform", action="append", required=True,
                   help="host platform tag, e.g. manylinux_2_39_x86_64 (widened to older glibc)")
    b.add_argument("--out", default=".wheelhouse")
    b.add_argument("--exclude", action="append", default=[], help="leave out one more package")
    b.add_argument("--include", action="append", default=[],
                   help="take a package back from the default exclusions")
    b.add_argument("--pin", action="append", default=[], help="NAME==VERSION override")
    b.add_argument("--with-deps", action="append", default=[],
                   help="follow the dependencies of a NO_DEPS package")
    b.add_argument("--pip-python", default=sys.executable,
                   help="interpreter whose pip (>= 22.2, for --report) is used")
    b.add_argument("--compare", help="a name==version list to compare the result with")
    b.add_argument("--strip", action="append", default=[], metavar="PACKAGE:MEMBER_GLOB",
                   help="leave this member out of the package's wheel (and its RECORD line)")
    b.add_argument("--extra", action="append", default=[], metavar="FILE",
                   help="a file carried with the wheels (in the pieces, not installed)")
    s = sub.add_parser("split", help="tar the wheelhouse into pieces")
    s.add_argument("folder")
    s.add_argument("--piece-mib", type=float, default=55)
    j = sub.add_parser("join", help="pieces -> wheelhouse folder")
    j.add_argument("folder")
    j.add_argument("--out", required=True)
    j.add_argument("--partial", action="store_true",
                   help="extract what the pieces present so far hold whole (no manifest needed)")
    i = sub.add_parser("install", help="install on the host, offline")
    i.add_argument("folder")
    i.add_argument("--python", default="python3")
    i.add_argument("--check-only", action="store_true", help="verify and check, install nothing")
    i.add_argument("--no-import-check", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            return cmd_build(a)
        if a.cmd == "split":
            paths = split(a.folder, int(a.piece_mib * 2**20))
            total = sum(p.stat().st_size for p in paths)
            print(f"{len(paths)} piece(s), {total / 2**20:.1f} MiB in all, "
                  f"largest {max(p.stat().st_size for p in paths) / 2**20:.1f} MiB: "
                  f"{paths[0].parent}/wheels.tar.part00..part{len(paths) - 1:02d}")
            return 0
        if a.cmd == "join":
            names = join(a.folder, a.out, a.partial)
            print(f"{len(names)} file(s) written to {a.out}")
            return 0
        return cmd_install(a)
    except WheelhouseError as e:
        print(f"wheelhouse {a.cmd}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
