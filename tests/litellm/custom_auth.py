"""Key check for the interop proxy: the master key and one virtual key pass, anything else is
rejected the way LiteLLM rejects a bad key (its auth error path answers 401 ``auth_error``)."""

from fastapi import Request
from litellm.proxy._types import UserAPIKeyAuth

ACCEPTED = {"sk-test-master", "sk-test-virtual"}


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    if api_key in ACCEPTED:
        return UserAPIKeyAuth(api_key=api_key)
    raise Exception("Invalid proxy server token passed. Received API key does not match any known key.")
