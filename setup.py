"""Builds qext with CMake (the one build of libqext, qext._C and the C++ tests) and packages
python/qext. Use `pip install --no-build-isolation -e .` inside the project's virtual environment
so the installed torch is the one compiled against (scripts/setup_env.sh does this)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_DIR = Path(os.environ.get("QEXT_BUILD_DIR", ROOT / "build"))


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch

        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        install_dir = BUILD_DIR / "install"
        configure = [
            "cmake", "-S", str(ROOT), "-B", str(BUILD_DIR), "-G", "Ninja",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_INSTALL_PREFIX={install_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('QEXT_BUILD_TYPE', 'Release')}",
        ]
        if "QEXT_WITH_CUDA" in os.environ:
            configure.append(f"-DQEXT_WITH_CUDA={os.environ['QEXT_WITH_CUDA']}")
        if not (BUILD_DIR / "CMakeCache.txt").exists() or "QEXT_WITH_CUDA" in os.environ:
            subprocess.check_call(configure)
        jobs = os.environ.get("QEXT_BUILD_JOBS", str(os.cpu_count() or 2))
        subprocess.check_call(["cmake", "--build", str(BUILD_DIR), "-j", jobs])
        subprocess.check_call(["cmake", "--install", str(BUILD_DIR)], stdout=subprocess.DEVNULL)

        # qext/_C*.so and libqext.so side by side (both have RPATH $ORIGIN).
        ext_path = Path(self.get_ext_fullpath(ext.name))
        ext_path.parent.mkdir(parents=True, exist_ok=True)
        built = next(BUILD_DIR.glob("_C*.so"))
        shutil.copy2(built, ext_path)
        shutil.copy2(BUILD_DIR / "libqext.so", ext_path.parent / "libqext.so")


setup(
    name="qext",
    version="0.1.0",
    description="Quantization for PyTorch: fake quantization, QAT, integer inference (LibTorch extension)",
    package_dir={"": "python"},
    packages=find_packages("python"),
    ext_modules=[CMakeExtension("qext._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=["torch"],
    zip_safe=False,
)
