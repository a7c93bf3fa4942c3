"""Avatars of the caller's tenant: upload a portrait (validated, face-cropped, encoded once,
stored), list, get, delete (every cached encoding of it is invalidated).

Another tenant's avatar answers 404 exactly as an unknown one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Response, UploadFile

from services.gateway import logs
from services.gateway.deps import GatewayDep, TenantDep
from services.gateway.errors import UnsupportedMediaTypeError
from services.gateway.schemas import ID_PATTERN, Avatar, AvatarList, ErrorBody, PathId
from services.store.records import AvatarInfo
from services.wire.errors import QuotaExceededError, ValidationError
from services.wire.images import check_side, image_header

router = APIRouter(prefix="/v1/avatars", tags=["avatars"])
ERRORS = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}, 429: {"model": ErrorBody}}
UPLOAD_ERRORS = ERRORS | {413: {"model": ErrorBody}, 415: {"model": ErrorBody}}


def avatar_out(info: AvatarInfo) -> Avatar:
    return Avatar(
        avatar_id=info.avatar_id,
        created_ms=info.created_ms,
        bytes=info.bytes,
        format=info.format,
        width=info.width,
        height=info.height,
        sha256=info.sha256,
    )


async def read_portrait(upload: UploadFile, limit: int) -> bytes:
    """The upload's bytes, at most `limit` (read one byte past it to know); size, format and the
    sides in the header checked here, before anything decodes it."""
    data = await upload.read(limit + 1)
    if len(data) > limit:
        # The tenant's quota (429 naming it, like every quota); bodies past any tenant's limit are
        # refused earlier, 413, by the app's body cap.
        raise QuotaExceededError(
            "max_portrait_bytes", f"the portrait is over the tenant's limit of {limit} bytes; upload a smaller image"
        )
    if not data:
        raise ValidationError("portrait", "empty; expected the JPEG or PNG bytes of a portrait")
    header = image_header(data)
    if header is None:
        raise UnsupportedMediaTypeError("portrait", "not a JPEG or PNG image; expected JPEG or PNG bytes")
    check_side("portrait", header[1], header[2])
    return data


@router.post("", status_code=201, response_model=Avatar, responses=UPLOAD_ERRORS)
async def upload_avatar(
    principal: TenantDep,
    gateway: GatewayDep,
    portrait: Annotated[UploadFile, File(description="a JPEG or PNG photo with one clearly visible face")],
    avatar_id: Annotated[
        str | None, Form(pattern=ID_PATTERN, description="the id to store it under; default: derived from the bytes")
    ] = None,
) -> Avatar:
    data = await read_portrait(portrait, principal.quotas.max_portrait_bytes)
    stored_id = await gateway.encoder.encode(principal.tenant_id, avatar_id or "", data)
    # The encoder stored the portrait (only one with a face); record it here too, so the metadata
    # is there whichever encoder ran (the same bytes again change nothing).
    info = await gateway.store.put_avatar(principal.tenant_id, stored_id, data)
    logs.log.info("avatar uploaded", extra={"event": "avatar.upload", "avatar_id": stored_id, "bytes": len(data)})
    return avatar_out(info)


@router.get("", response_model=AvatarList, responses=ERRORS)
async def list_avatars(principal: TenantDep, gateway: GatewayDep) -> AvatarList:
    return AvatarList(avatars=[avatar_out(a) for a in await gateway.store.list_avatars(principal.tenant_id)])


@router.get("/{avatar_id}", response_model=Avatar, responses=ERRORS)
async def get_avatar(avatar_id: PathId, principal: TenantDep, gateway: GatewayDep) -> Avatar:
    return avatar_out(await gateway.store.avatar_info(principal.tenant_id, avatar_id))


@router.delete("/{avatar_id}", status_code=204, response_class=Response, responses=ERRORS)
async def delete_avatar(avatar_id: PathId, principal: TenantDep, gateway: GatewayDep) -> Response:
    await gateway.store.delete_avatar(principal.tenant_id, avatar_id)
    logs.log.info("avatar deleted", extra={"event": "avatar.delete", "avatar_id": avatar_id})
    return Response(status_code=204)
