"""Short names for what routes depend on."""

from typing import Annotated

from fastapi import Depends, Request

from service.engine import Engine


async def get_engine(request: Request) -> Engine:  # async: no threadpool hop per request
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]
