"""Builds pydl._C with CMake + Ninja (no torch at build time).

Environment knobs (all optional):
  PYDL_CUDA=AUTO|ON|OFF     build the CUDA kernels (AUTO: when nvcc is found)
  PYDL_CUDA_ARCHS="80;90a"  CUDA architectures, CMake syntax ("native" = this machine's GPU)
  PYDL_SANITIZE=address,undefined   sanitizer build of the C++ code
  PYDL_BUILD_TYPE=Release   CMake build type
  PYDL_BUILD_JOBS=N         parallel compile jobs (default: all cores)
  PYDL_BUILD_DIR=path       CMake build tree (default build/cmake-<python tag>-<variant>, the
                            variant naming build type, sanitizer and CUDA setting, e.g.
                            build/cmake-cpython-311-release-cuda80_90a or ...-release-cpu)

Repeated builds in one checkout (`pip install .`, `pip install -e .`, `pip wheel .`,
`python setup.py build_ext --inplace`, in any order) must always work and stay incremental.
pip builds each time in a fresh temporary environment whose cmake, ninja and pybind11 are
deleted afterwards, while the in-tree CMake build directory survives; CMakeCache.txt remembers
the tool paths of the run that configured it and CMake never looks them up again, so the next
build fails on the deleted ninja. Hence:

* cmake and ninja are the ones of the running build environment (the `cmake` / `ninja` Python
  packages, else PATH), cmake is run by absolute path and ninja is passed as
  CMAKE_MAKE_PROGRAM on every configure;
* before configuring, the cache is checked against the current toolchain (source directory,
  generator, cmake, ninja, the C/C++/CUDA compilers it recorded, $CC/$CXX/$CUDACXX, an nvcc that
  appeared after a CPU-only configure); on any mismatch CMakeCache.txt and CMakeFiles/ are removed
  *except* the per-target object directories (CMakeFiles/*.dir) and ninja's .ninja_log /
  .ninja_deps, so a reconfigure reuses every object whose compile command did not change (ninja
  rebuilds on a changed command line, so this is safe);
* the pybind11 headers and CMake config are copied once per pybind11 version into the build
  directory (mtimes kept), so the include path in the compile commands does not change with
  pip's temporary directory and an isolated rebuild does not recompile everything;
* CMake links into <build dir>/lib, a path that does not change between builds, and the module
  is then copied where setuptools wants it (pydl/ for --inplace, a temporary directory for
  `pip install -e .`, build/lib.* otherwise): a changed output path would relink every time, and
  pybind11's Release link is an LTO link that costs as much as the compile;
* the default build directory depends on the build configuration, so `make build` (sm_90a) and
  `pip install .` (80;90a) in one checkout each keep their own incremental tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    text = (ROOT / "pydl" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


def find_tool(name: str, package: str, attr: str) -> str:
    """The `name` executable of the build environment's `package` (pip's isolated env), else PATH."""
    try:
        mod = __import__(package)
        candidate = Path(getattr(mod, attr)) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except (ImportError, AttributeError):
        pass
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"pydl build: `{name}` not found (pip install {package})")
    return found


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def read_cmake_cache(build_dir: Path) -> dict[str, str]:
    cache = {}
    path = build_dir / "CMakeCache.txt"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            m = re.match(r"^([A-Za-z_][A-Za-z0-9_.+-]*):[A-Z]+=(.*)$", line)
            if m:
                cache[m.group(1)] = m.group(2)
    return cache


def stale_cache_reason(build_dir: Path, cmake: str, ninja: str) -> str | None:
    """Why the build directory's CMake cache cannot be reused with the current toolchain."""
    cache = read_cmake_cache(build_dir)
    if not cache:
        return None
    home = cache.get("CMAKE_HOME_DIRECTORY", "")
    if not home or not _same_file(home, str(ROOT)):
        return f"configured for source dir {home!r}"
    if cache.get("CMAKE_GENERATOR") != "Ninja":
        return f"generator {cache.get('CMAKE_GENERATOR')!r}"
    for key, current in (("CMAKE_COMMAND", cmake), ("CMAKE_MAKE_PROGRAM", ninja)):
        cached = cache.get(key, "")
        if not cached or not os.path.exists(cached) or not _same_file(cached, current):
            return f"{key} {cached!r} -> {current!r}"
    for lang, env_var in (("C", "CC"), ("CXX", "CXX"), ("CUDA", "CUDACXX")):
        cached = cache.get(f"CMAKE_{lang}_COMPILER", "")
        if lang == "CUDA" and (not cached or cached.endswith("NOTFOUND")):
            # check_language(CUDA) caches a miss for good; retry once nvcc is available.
            if os.environ.get("PYDL_CUDA", "AUTO").upper() != "OFF" and (
                os.environ.get("CUDACXX") or shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
            ):
                return "CUDA compiler not found before, available now"
            continue
        if not cached:
            continue
        if not os.path.isabs(cached) or not os.path.exists(cached):
            return f"CMAKE_{lang}_COMPILER {cached!r} is gone"
        requested = os.environ.get(env_var, "").split()
        if requested:
            wanted = shutil.which(requested[0])
            if wanted and not _same_file(wanted, cached):
                return f"${env_var}={requested[0]} but the cache has {cached}"
    return None


def reset_cmake_cache(build_dir: Path) -> None:
    """Drop the configure state, keep compiled objects (CMakeFiles/*.dir) and ninja's logs."""
    (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
    cmake_files = build_dir / "CMakeFiles"
    if cmake_files.is_dir():
        for entry in cmake_files.iterdir():
            if entry.is_dir() and entry.name.endswith(".dir"):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def stable_pybind11_dir(build_dir: Path) -> str:
    """pybind11's CMake dir, from a per-version copy inside build_dir when the layout allows."""
    import pybind11

    cmake_dir = Path(pybind11.get_cmake_dir()).resolve()
    prefix = cmake_dir.parents[2]  # <prefix>/share/cmake/pybind11 with headers in <prefix>/include
    if not (prefix / "include" / "pybind11").is_dir():
        return str(cmake_dir)
    dest = build_dir / f"pybind11-{pybind11.__version__}"
    if not (dest / ".complete").exists():
        tmp = build_dir / f"pybind11-{pybind11.__version__}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(prefix / "include", tmp / "include")  # copy2: mtimes kept
        shutil.copytree(cmake_dir, tmp / cmake_dir.relative_to(prefix))
        (tmp / ".complete").touch()
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return str(dest / cmake_dir.relative_to(prefix))


def default_build_dir(env) -> Path:
    sanitize = env.get("PYDL_SANITIZE", "")
    build_type = env.get("PYDL_BUILD_TYPE", "Release")
    cuda = env.get("PYDL_CUDA", "AUTO").upper()
    archs = env.get("PYDL_CUDA_ARCHS", "80;90a")
    parts = [build_type.lower()] + (["sanitize"] if sanitize else [])
    parts.append("cpu" if cuda == "OFF" else "cuda" + re.sub(r"[^A-Za-z0-9]+", "_", archs).strip("_"))
    return ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{'-'.join(parts)}"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        env = os.environ
        build_dir = Path(env.get("PYDL_BUILD_DIR") or default_build_dir(env)).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = find_tool("cmake", "cmake", "CMAKE_BIN_DIR")
        ninja = find_tool("ninja", "ninja", "BIN_DIR")
        reason = stale_cache_reason(build_dir, cmake, ninja)
        if reason:
            print(f"pydl build: reconfiguring {build_dir} ({reason})", flush=True)
            reset_cmake_cache(build_dir)
        cmake_args = [
            "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM:FILEPATH={ninja}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={build_dir / 'lib'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={stable_pybind11_dir(build_dir)}",
            f"-DCMAKE_BUILD_TYPE={env.get('PYDL_BUILD_TYPE', 'Release')}",
            f"-DPYDL_VERSION={read_version()}",
            f"-DPYDL_CUDA={env.get('PYDL_CUDA', 'AUTO')}",
            f"-DPYDL_CUDA_ARCHS={env.get('PYDL_CUDA_ARCHS', '80;90a')}",
            f"-DPYDL_SANITIZE={env.get('PYDL_SANITIZE', '')}",
        ]
        jobs = env.get("PYDL_BUILD_JOBS") or str(os.cpu_count() or 2)
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *cmake_args], check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        built = build_dir / "lib" / target.name
        if not built.is_file():
            raise RuntimeError(f"pydl build: CMake did not produce {built}")
        # Copy to a temporary name, then rename: a process that has the old pydl/_C*.so mapped
        # keeps its (unlinked) copy instead of reading a file rewritten under it.
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp{os.getpid()}-{target.name}")
        shutil.copy2(built, tmp)
        os.replace(tmp, target)


setup(
    version=read_version(),
    ext_modules=[CMakeExtension("pydl._C")],
    cmdclass={"build_ext": CMakeBuild},
)
