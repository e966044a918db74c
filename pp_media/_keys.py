"""Names shared by the collate side and the stage-0 side of pp_media."""

from __future__ import annotations

from pp_media._layouts import SEED_LAYOUT

#: Batch key under which the per-microbatch media chunks travel from collate to the step.
VLM_PP_MEDIA_KEY = "_vlm_pp_media_chunks"

#: The seed's processor fields whose dim 0 is not the sample dimension (or that describe such
#: fields): the media fields of ``SEED_LAYOUT``, which ``prepare_vlm_media_for_pp`` takes out.
_VLM_MEDIA_KEYS: tuple[str, ...] = SEED_LAYOUT.media_fields
