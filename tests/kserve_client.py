"""KServe's clients, run in a process of their own for the tests: `python tests/kserve_client.py`.

KServe's generated protocol messages and tritonclient's (which the service and the other tests
load) define the same `inference.*` names, and one process's protobuf pool takes only one of
them. So the tests hand this script their calls as JSON on stdin and read the answers, the
tensors as base64 of their raw bytes, from stdout.

A call: {"transport": "rest" or "grpc", "address", "model", "shape", "data" (base64 of
float32), "parameters", "id"}. An answer: {"model_name", "id", "outputs": {name: {"shape",
"data"}}} or {"error": {"status", "message"}}.
"""

import asyncio
import base64
import json
import sys
from typing import Any

import grpc
import httpx
import numpy as np
from kserve import (
    InferenceGRPCClient,
    InferenceRESTClient,
    InferInput,
    InferRequest,
    RESTConfig,
)


def request_of(call: dict[str, Any]) -> InferRequest:
    array = np.frombuffer(base64.b64decode(call["data"]), np.float32).reshape(call["shape"])
    tensor = InferInput(name="embeddings", shape=list(array.shape), datatype="FP32")
    tensor.set_data_from_numpy(array)  # the client's default
    parameters = call["parameters"]
    if call["transport"] == "grpc":  # KServe's gRPC InferParameter has no double: a string
        parameters = {
            name: str(value) if isinstance(value, float) else value
            for name, value in parameters.items()
        }
    return InferRequest(
        model_name=call["model"],
        infer_inputs=[tensor],
        parameters=parameters,
        request_id=call.get("id"),
    )


def answer_of(response: Any) -> dict[str, Any]:
    return {
        "model_name": response.model_name,
        "id": response.id,
        "outputs": {
            output.name: {
                "shape": list(output.as_numpy().shape),
                "dtype": str(output.as_numpy().dtype),
                "data": base64.b64encode(output.as_numpy().tobytes()).decode(),
            }
            for output in response.outputs
        },
    }


async def run(call: dict[str, Any]) -> dict[str, Any]:
    request = request_of(call)
    if call["transport"] == "rest":
        client = InferenceRESTClient(config=RESTConfig(protocol="v2"))
        try:
            path_model = call.get("path_model", call["model"])
            response = await client.infer(
                f"http://{call['address']}", request, model_name=path_model
            )
        except httpx.HTTPStatusError as error:
            return {"error": {"status": error.response.status_code, "message": str(error)}}
        finally:
            await client.close()
        return answer_of(response)
    client = InferenceGRPCClient(call["address"])
    try:
        response = await client.infer(request)
    except grpc.aio.AioRpcError as error:
        return {"error": {"status": error.code().name, "message": error.details()}}
    finally:
        await client.close()
    return answer_of(response)


async def main() -> None:
    calls = json.load(sys.stdin)
    answers = [await run(call) for call in calls]
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    asyncio.run(main())
