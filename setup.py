"""The build's settings are in setup.cfg. This file only keeps modules out of the resource folder
jatos_lite_files: its source folder is the project's root (jatos.js and admin.html sit beside
jatos_lite.py), and setuptools would otherwise copy every module found there into it."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        if package == "jatos_lite_files":
            return []  # data only: jatos_lite.py is installed once, as the module
        return super().find_package_modules(package, package_dir)


setup(cmdclass={"build_py": BuildPy})
