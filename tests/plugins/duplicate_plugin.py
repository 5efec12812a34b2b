"""A plugin that reuses a built-in name: the registry must refuse it."""

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, kw_only=True)
class Config:
    pass


class FakeDPDM:
    name: ClassVar[str] = "dpdm"
    Config: ClassVar[type] = Config
    conditional: ClassVar[bool] = True
    guarantee: ClassVar[str] = "end-to-end"
    needs_public_data: ClassVar[bool] = False

    def __init__(self, config, *, spec, device): ...
    def fit(self, train, *, budget, generator, progress): ...
    def sample(self, n, *, labels, generator): ...
    def state_dict(self):
        return {}

    def load_state_dict(self, state): ...
