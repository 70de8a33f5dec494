"""vLLM's runtime LoRA endpoints: POST /v1/load_lora_adapter and /v1/unload_lora_adapter.

Like vLLM (VLLM_ALLOW_RUNTIME_LORA_UPDATING) they are off unless the server was started with
--allow-runtime-lora (or SUGAM_ALLOW_RUNTIME_LORA_UPDATING=1): a load reads whatever path the client
names on the server's disk. They sit behind the API key like every /v1 route. A load reads and
checks the adapter in a worker thread (the event loop keeps serving); an adapter that does not fit
(rank, architecture, shapes, files) is refused with the reason, and nothing of it stays loaded.
Unloading forgets the name at once; requests already using the adapter finish with it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from ..engine.llm_engine import LLMEngine
from ..lora.adapter import LoRARequest
from .errors import APIError
from .protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

if TYPE_CHECKING:
    from .app import Server

HOW_TO_ENABLE = ("start the server with --enable-lora (or --lora NAME=PATH) and --allow-runtime-lora "
                 "(or SUGAM_ALLOW_RUNTIME_LORA_UPDATING=1)")


def router(server: Server) -> APIRouter:
    routes = APIRouter()

    def lora_engine() -> LLMEngine:
        if not server.config.allow_runtime_lora:  # as in vLLM, where the routes then do not exist
            raise APIError(404, f"loading LoRA adapters at runtime is off on this server; to allow it, {HOW_TO_ENABLE}",
                           code="runtime_lora_disabled")
        engine = server.ready_engine().engine
        if engine.loras is None:
            raise APIError(400, f"LoRA adapters are off on this server; to load them, {HOW_TO_ENABLE}",
                           code="lora_disabled")
        return engine

    @routes.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterRequest) -> PlainTextResponse:
        engine = lora_engine()
        name = req.lora_name
        if name == server.config.model_name:
            raise APIError(400, f"{name!r} is the base model's name; give the adapter another", param="lora_name")
        if engine.loras is not None and engine.loras.get(name) is not None:
            raise APIError(400, f"the LoRA adapter {name!r} is already loaded (unload it first to replace it)",
                           param="lora_name")
        request = LoRARequest(name, server.next_lora_id(), req.lora_path)
        # Reading and checking the files takes a while: in a worker thread. LoRAError -> 400 with the reason.
        await asyncio.to_thread(engine.add_lora, request)
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @routes.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        engine = lora_engine()
        if not engine.remove_lora(req.lora_name):
            raise APIError(404, f"the LoRA adapter {req.lora_name!r} is not loaded", param="lora_name",
                           code="model_not_found")
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    return routes
