"""Every public function, class and method of the library has a docstring (inherited ones count:
an override of a documented protocol method, e.g. ``Reward.score``, is documented by its base)."""
import importlib
import inspect
import pkgutil

import flowalign

PACKAGES = ["flowalign", "flowalign.objectives", "flowalign.pipelines", "flowalign.rewards", "flowalign.train"]


def _modules():
    for name in PACKAGES:
        package = importlib.import_module(name)
        yield package
        for info in pkgutil.iter_modules(package.__path__):
            if not info.ispkg and not info.name.startswith("_"):
                yield importlib.import_module(f"{name}.{info.name}")


def _undocumented(module):
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # private, or imported from elsewhere
        if inspect.isfunction(obj) and not inspect.getdoc(obj):
            yield f"{module.__name__}.{name}"
        if inspect.isclass(obj):
            if not inspect.getdoc(obj):
                yield f"{module.__name__}.{name}"
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                function = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
                if inspect.isfunction(function) and not inspect.getdoc(getattr(obj, attr) if not isinstance(member, property) else member):
                    yield f"{module.__name__}.{name}.{attr}"


def test_public_api_is_documented():
    missing = sorted({item for module in _modules() for item in _undocumented(module)})
    assert missing == [], f"{len(missing)} public objects without a docstring: {missing}"


def test_the_check_sees_a_missing_docstring():
    import types

    module = types.ModuleType("fake")
    exec("def public(x):\n    return x\n\nclass Thing:\n    '''doc'''\n    def method(self):\n        return 1\n"
         "    @property\n    def size(self):\n        return 2\n", module.__dict__)
    assert sorted(_undocumented(module)) == ["fake.Thing.method", "fake.Thing.size", "fake.public"]
    assert flowalign.__doc__  # the package itself
