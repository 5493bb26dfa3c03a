"""OpenAI-shaped API errors raised inside the emulator.

Every refusal the emulator makes is an :class:`ApiError`; the server turns it into
the status code and the body OpenAI sends::

    {"error": {"message": "...", "type": "...", "param": null, "code": null}}

The helpers below name the refusals the emulator makes more than once, with the
wording the real API uses where it is known.
"""

from __future__ import annotations

from typing import Any

from embedd.errors import EmbeddError


class ApiError(EmbeddError):
    """The emulated API refused the request."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI sends for this error."""
        return error_body(self.message, type_=self.type, param=self.param, code=self.code)


def error_body(
    message: str,
    *,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    """Build ``{"error": {...}}`` with all four keys present."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 ``invalid_request_error``."""
    return ApiError(400, message, param=param, code=code)


def invalid_value(param: str) -> ApiError:
    """The real API's generic wording for a field that fails its schema."""
    return invalid(
        f"'$.{param}' is invalid. Please check the API reference: "
        "https://platform.openai.com/docs/api-reference.",
        param=param,
    )


def not_found(kind: str, object_id: str, param: str = "id") -> ApiError:
    """A 404 for an unknown file or batch id."""
    return ApiError(404, f"No {kind} found with id '{object_id}'.", param=param)


def model_not_found(model: str) -> ApiError:
    """A 404 for a model the emulator does not serve."""
    return ApiError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def unauthorized(has_key: bool) -> ApiError:
    """A 401; the message never repeats the key that was sent."""
    if not has_key:
        return ApiError(
            401,
            "You didn't provide an API key. You need to provide your API key in an "
            "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        )
    return ApiError(
        401,
        "Incorrect API key provided. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        code="invalid_api_key",
    )
