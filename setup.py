"""Builds pydl._C with CMake + Ninja (no torch at build time).

Environment knobs (all optional):
  PYDL_CUDA=AUTO|ON|OFF     build the CUDA kernels (AUTO: when nvcc is found)
  PYDL_CUDA_ARCHS="80;90a"  CUDA architectures, CMake syntax ("native" = this machine's GPU)
  PYDL_SANITIZE=address,undefined   sanitizer build of the C++ code
  PYDL_BUILD_TYPE=Release   CMake build type
  PYDL_BUILD_JOBS=N         parallel compile jobs (default: all cores)
  PYDL_BUILD_DIR=path       CMake build tree (default build/cmake-<python tag>-<variant>)
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def read_version() -> str:
    text = (ROOT / "pydl" / "_version.py").read_text()
    return re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        env = os.environ
        sanitize = env.get("PYDL_SANITIZE", "")
        variant = "sanitize" if sanitize else "release"
        build_dir = Path(env.get("PYDL_BUILD_DIR") or ROOT / "build" / f"cmake-{sys.implementation.cache_tag}-{variant}")
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={env.get('PYDL_BUILD_TYPE', 'Release')}",
            f"-DPYDL_VERSION={read_version()}",
            f"-DPYDL_CUDA={env.get('PYDL_CUDA', 'AUTO')}",
            f"-DPYDL_CUDA_ARCHS={env.get('PYDL_CUDA_ARCHS', '80;90a')}",
            f"-DPYDL_SANITIZE={sanitize}",
            "-G", "Ninja",
        ]
        jobs = env.get("PYDL_BUILD_JOBS") or str(os.cpu_count() or 2)
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *cmake_args], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    version=read_version(),
    packages=find_packages(include=["pydl", "pydl.*"]),
    ext_modules=[CMakeExtension("pydl._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
