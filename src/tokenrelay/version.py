"""The package version, in a module of its own so that any module can import it.

``tokenrelay/__init__.py`` re-exports it as ``tokenrelay.__version__``; modules inside the
package import it from here, since the package ``__init__`` sits above them (its
``create_app`` imports app.py, which imports the routes). Keep it equal to
``version`` in pyproject.toml.
"""

__version__ = "0.1.0"
