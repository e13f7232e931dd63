"""GET /v1/models: every --served-model-name of the one model this server runs."""

from __future__ import annotations

import time

from tessera.api.protocol import ModelCard, ModelList
from tessera.api.serving_common import ServingContext


class ServingModels:
    def __init__(self, ctx: ServingContext) -> None:
        self.ctx = ctx
        self.created = int(time.time())

    def list_models(self) -> ModelList:
        info = self.ctx.model_info
        return ModelList(data=[
            ModelCard(id=name, created=self.created, root=info.model_path, max_model_len=info.max_model_len)
            for name in self.ctx.served_model_names
        ])
