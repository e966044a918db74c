"""stage_vlm_media_for_pp, current_media and step_with_media in one process.

A world-size-1 gloo group runs real torch schedules with a single stage (first and last at
once), which is enough to check what the staging leaves behind, what each forward sees, and
the seed-compatible behaviour without a visible torch stage.
"""

from __future__ import annotations

import gc
import re
import socket
import weakref
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

import pp_media

COMPAT_ATTRS = (
    "_vlm_pixel_values_chunks",
    "_vlm_image_grid_hws_chunks",
    "_vlm_num_patches_chunks",
    "_vlm_patch_pixel_values_chunks",
    "_vlm_patch_newline_mask_chunks",
    "_vlm_pixel_values_videos_chunks",
    "_vlm_video_grid_thw_chunks",
    "_vlm_chunk_idx",
)


@pytest.fixture(scope="module", autouse=True)
def single_rank_group() -> Iterator[None]:
    """A one-rank gloo group: torch's pipeline stages need a process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Recorder(nn.Module):
    """Stage 0 that records, per forward, the seed index and the media it sees."""

    def __init__(self, fail_on_microbatch: int | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.seen: list[dict[str, Any]] = []
        self.fail_on_microbatch = fail_on_microbatch

    def forward(self, input_ids: torch.Tensor, **media_kwargs: torch.Tensor) -> torch.Tensor:
        media = pp_media.current_media(self)
        owners = None if media is None else media["pixel_values"][:, 0].tolist()
        self.seen.append(
            {
                "samples": input_ids[:, 0].tolist(),
                "chunk_idx": getattr(self, "_vlm_chunk_idx", None),
                "owners": owners,
                "kwargs": sorted(media_kwargs),
            }
        )
        if self.fail_on_microbatch is not None and self.fail_on_microbatch in owners:
            raise RuntimeError("boom")
        return self.linear(input_ids.float())


def prepared_batch(images_per_sample: list[int], n_microbatches: int) -> dict[str, Any]:
    """input_ids[i] = i; one patch row per image, whose value is its owner's id."""
    batch_size = len(images_per_sample)
    owners = [i for i, n in enumerate(images_per_sample) for _ in range(n)]
    batch: dict[str, Any] = {
        "input_ids": torch.arange(batch_size).repeat_interleave(3).view(batch_size, 3),
        "pixel_values": torch.tensor(owners, dtype=torch.float32).view(-1, 1).repeat(1, 4),
        "image_grid_thw": torch.ones(len(owners), 3, dtype=torch.int64),
        "n_images_per_sample": torch.tensor(images_per_sample),
    }
    return pp_media.prepare_vlm_media_for_pp(batch, batch_size, n_microbatches)


def make_schedule(module: nn.Module, n_microbatches: int, cls: type = ScheduleGPipe) -> Any:
    stage = PipelineStage(module, 0, 1, torch.device("cpu"))
    return cls(stage, n_microbatches, loss_fn=lambda output, target: output.sum())


def test_each_forward_sees_its_microbatch_and_the_engine_index() -> None:
    module = Recorder()
    schedule = make_schedule(module, 4, Schedule1F1B)
    batch = prepared_batch([0, 0, 2, 1, 0, 3], 4)
    with pp_media.stage_vlm_media_for_pp(schedule, [module], batch):
        schedule.step(batch["input_ids"], target=torch.zeros(6, 3))
    # Shape inference forward (microbatch 0) first, then microbatches 0..3.
    assert [seen["chunk_idx"] for seen in module.seen] == [0, 0, 1, 2, 3]
    assert [seen["samples"] for seen in module.seen] == [[0, 1], [0, 1], [2, 3], [4], [5]]
    assert [seen["owners"] for seen in module.seen] == [[], [], [2, 2, 3], [], [5, 5, 5]]
    assert pp_media.VLM_PP_MEDIA_KEY not in batch


def test_current_media_is_none_outside_a_staged_step() -> None:
    module = Recorder()
    assert pp_media.current_media(module) is None
    schedule = make_schedule(module, 2)
    batch = prepared_batch([1, 1, 1, 1], 2)
    with pp_media.stage_vlm_media_for_pp(schedule, [module], batch):
        assert pp_media.current_media(module) is None  # staged, but no forward running
        schedule.step(batch["input_ids"], target=torch.zeros(4, 3))
    assert pp_media.current_media(module) is None


def _assert_released(module: nn.Module, schedule: Any, refs: list[weakref.ref]) -> None:
    for attr in COMPAT_ATTRS:
        assert getattr(module, attr) is None, attr
    assert module._pp_media_state is None
    stage = schedule._stage
    assert "forward_one_chunk" not in vars(stage)
    assert "_prepare_forward_infra" not in vars(stage)
    gc.collect()
    alive = [ref() for ref in refs if ref() is not None]
    assert not alive, f"{len(alive)} media tensors are still referenced"


def _media_refs(batch: dict[str, Any]) -> list[weakref.ref]:
    media = batch[pp_media.VLM_PP_MEDIA_KEY]
    return [weakref.ref(chunk) for chunks in media.values() for chunk in chunks]


def test_nothing_refers_to_the_media_after_the_step() -> None:
    module = Recorder()
    schedule = make_schedule(module, 2)
    batch = prepared_batch([1, 2, 0, 1], 2)
    refs = _media_refs(batch)
    with pp_media.stage_vlm_media_for_pp(schedule, [module], batch):
        schedule.step(batch["input_ids"], target=torch.zeros(4, 3))
    module.seen.clear()
    _assert_released(module, schedule, refs)


def test_nothing_refers_to_the_media_after_a_failing_step() -> None:
    module = Recorder(fail_on_microbatch=3)
    schedule = make_schedule(module, 2)
    batch = prepared_batch([1, 2, 0, 1], 2)
    refs = _media_refs(batch)
    raised = False
    try:
        with pp_media.stage_vlm_media_for_pp(schedule, [module], batch):
            schedule.step(batch["input_ids"], target=torch.zeros(4, 3))
    except RuntimeError as error:
        raised = "boom" in repr(error.__cause__)
    assert raised
    module.seen.clear()
    schedule._stage.clear_runtime_states()  # torch's own per-step caches
    _assert_released(module, schedule, refs)


def test_without_a_torch_stage_a_pending_shape_inference_forward_resets_the_index() -> None:
    class SeedStyle(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.used = [*getattr(self, "used", []), self._vlm_chunk_idx]
            self._vlm_chunk_idx += 1
            return x

    module = SeedStyle()
    pending = SimpleNamespace(_stage_forward_initialized=False)
    pp = SimpleNamespace(info=SimpleNamespace(has_first_stage=True, schedule=pending))
    with pp_media.stage_vlm_media_for_pp(pp, [module], prepared_batch([1, 1], 2)):
        for _ in range(3):  # shape inference, then microbatches 0 and 1
            module(torch.zeros(1))
    assert module.used == [0, 0, 1]

    module.used = []
    initialized = SimpleNamespace(_stage_forward_initialized=True)
    pp = SimpleNamespace(info=SimpleNamespace(has_first_stage=True, schedule=initialized))
    with pp_media.stage_vlm_media_for_pp(pp, [module], prepared_batch([1, 1], 2)):
        for _ in range(2):
            module(torch.zeros(1))
    assert module.used == [0, 1]


class SeedStyle(nn.Module):
    """Seed-style stage 0: reads its media at ``_vlm_chunk_idx`` and advances the index."""

    def __init__(self) -> None:
        super().__init__()
        self.used: list[int] = []
        self.owners: list[list[float]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = self._vlm_chunk_idx
        self.used.append(index)
        self.owners.append(self._vlm_pixel_values_chunks[index][:, 0].tolist())
        self._vlm_chunk_idx += 1
        return x


def _seed_pp(stage: Any, where: str) -> Any:
    """The seed's ``pp`` with a pending duck schedule and ``stage`` found at ``where``."""
    schedule = SimpleNamespace(_stage_forward_initialized=False)
    info = SimpleNamespace(has_first_stage=True, schedule=schedule)
    if where == "info.stages":
        info.stages = [SimpleNamespace(is_first=False), stage]
    elif where == "schedule._stage":
        schedule._stage = stage
    else:
        schedule._stages = [stage, SimpleNamespace(is_first=False)]
    return SimpleNamespace(info=info)


STATIC_FIRST_STAGES = {
    "outputs_meta": SimpleNamespace(is_first=True, _outputs_meta=(torch.empty(1),)),
    "user_meta": SimpleNamespace(
        is_first=True, _user_meta=SimpleNamespace(inputs=(object(),), outputs=(object(),))
    ),
}


@pytest.mark.parametrize("where", ["info.stages", "schedule._stage", "schedule._stages"])
@pytest.mark.parametrize("kind", sorted(STATIC_FIRST_STAGES))
def test_without_a_torch_stage_static_shapes_keep_the_index_after_the_first_forward(
    kind: str, where: str
) -> None:
    module = SeedStyle()
    pp = _seed_pp(STATIC_FIRST_STAGES[kind], where)
    with pp_media.stage_vlm_media_for_pp(pp, [module], prepared_batch([1, 1], 2)):
        for _ in range(2):  # no shape-inference forward: microbatches 0 and 1
            module(torch.zeros(1))
    assert module.used == [0, 1]
    assert module.owners == [[0.0], [1.0]]


@pytest.mark.parametrize(
    "stage",
    [
        SimpleNamespace(
            is_first=True, _user_meta=SimpleNamespace(inputs=(object(),), outputs=None)
        ),
        SimpleNamespace(is_first=True, _user_meta=None, _outputs_meta=None),
        SimpleNamespace(is_first=False, _outputs_meta=(torch.empty(1),)),
    ],
    ids=["user_meta_without_outputs", "nothing_configured", "static_but_not_first"],
)
def test_without_a_torch_stage_incomplete_static_shapes_still_reset_the_index(stage: Any) -> None:
    module = SeedStyle()
    pp = _seed_pp(stage, "info.stages")
    with pp_media.stage_vlm_media_for_pp(pp, [module], prepared_batch([1, 1], 2)):
        for _ in range(3):  # shape inference, then microbatches 0 and 1
            module(torch.zeros(1))
    assert module.used == [0, 0, 1]
    assert module.owners == [[0.0], [0.0], [1.0]]


def test_current_media_without_a_torch_stage_says_how_to_fix_it() -> None:
    module = Recorder()
    pp = SimpleNamespace(info=SimpleNamespace(has_first_stage=True))
    with (
        pp_media.stage_vlm_media_for_pp(pp, [module], prepared_batch([1, 1], 2)),
        pytest.raises(RuntimeError, match=re.escape("Pass the torch schedule itself as pp")),
    ):
        pp_media.current_media(module)


def test_a_rank_without_stage_0_only_drops_the_media() -> None:
    module = Recorder()
    pp = SimpleNamespace(info=SimpleNamespace(has_first_stage=False))
    batch = prepared_batch([1, 1], 2)
    with pp_media.stage_vlm_media_for_pp(pp, [module], batch):
        assert pp_media.VLM_PP_MEDIA_KEY not in batch
        assert getattr(module, "_pp_media_state", None) is None
        assert not hasattr(module, "_vlm_pixel_values_chunks")


def test_a_batch_without_media_stages_nothing() -> None:
    module = Recorder()
    schedule = make_schedule(module, 2)
    batch = {"input_ids": torch.zeros(4, 3, dtype=torch.long)}
    with pp_media.stage_vlm_media_for_pp(schedule, [module], batch):
        assert getattr(module, "_pp_media_state", None) is None
    assert "forward_one_chunk" not in vars(schedule._stage)


def test_nested_staging_is_refused_and_keeps_the_inner_batch() -> None:
    module = Recorder()
    schedule = make_schedule(module, 2)
    outer, inner = prepared_batch([1, 1], 2), prepared_batch([1, 1], 2)
    with pp_media.stage_vlm_media_for_pp(schedule, [module], outer):
        with (
            pytest.raises(RuntimeError, match="cannot be nested"),
            pp_media.stage_vlm_media_for_pp(schedule, [module], inner),
        ):
            pass
        assert pp_media.VLM_PP_MEDIA_KEY in inner


@pytest.mark.parametrize(("prepared", "scheduled"), [(2, 4), (4, 2)])
def test_media_prepared_for_another_microbatch_count(prepared: int, scheduled: int) -> None:
    module = Recorder()
    schedule = make_schedule(module, scheduled)
    batch = prepared_batch([1, 1, 1, 1], prepared)
    message = f"prepared for {prepared} microbatches but the schedule runs {scheduled}"
    with (
        pytest.raises(ValueError, match=re.escape(message)),
        pp_media.stage_vlm_media_for_pp(schedule, [module], batch),
    ):
        pass
    assert pp_media.VLM_PP_MEDIA_KEY in batch  # nothing lost
    media = batch.pop(pp_media.VLM_PP_MEDIA_KEY)
    with pytest.raises(ValueError, match=re.escape(message)):
        pp_media.step_with_media(schedule, batch["input_ids"], media=media)


def test_without_a_visible_schedule_a_too_short_media_list_fails_in_the_forward() -> None:
    module = Recorder()
    stage = make_schedule(module, 4)._stage
    schedule = ScheduleGPipe(stage, 4, loss_fn=lambda output, target: output.sum())
    pp = SimpleNamespace(info=SimpleNamespace(has_first_stage=True, stages=[stage]))
    batch = prepared_batch([1, 1, 1, 1], 2)
    with (
        pytest.raises(RuntimeError) as failure,
        pp_media.stage_vlm_media_for_pp(pp, [module], batch),
    ):
        schedule.step(batch["input_ids"], target=torch.zeros(4, 3))
    cause = repr(failure.value.__cause__)
    assert "the schedule computes microbatch 2 but the media were prepared for 2" in cause


def test_pp_that_is_neither_a_schedule_nor_the_seed_type() -> None:
    with (
        pytest.raises(TypeError, match="pp must be a torch pipeline schedule"),
        pp_media.stage_vlm_media_for_pp(object(), [Recorder()], {}),
    ):
        pass


def test_pp_info_that_contradicts_the_torch_stages() -> None:
    schedule = make_schedule(Recorder(), 2)
    pp = SimpleNamespace(info=SimpleNamespace(has_first_stage=False, schedule=schedule))
    with (
        pytest.raises(ValueError, match=re.escape("pp.info.has_first_stage is False")),
        pp_media.stage_vlm_media_for_pp(pp, [Recorder()], prepared_batch([1, 1], 2)),
    ):
        pass


def test_step_with_media_passes_media_as_kwargs_and_skips_text_only_microbatches() -> None:
    module = Recorder()
    schedule = make_schedule(module, 3)
    batch = prepared_batch([0, 2, 1], 3)
    media = batch.pop(pp_media.VLM_PP_MEDIA_KEY)
    pp_media.step_with_media(schedule, batch["input_ids"], media=media, target=torch.zeros(3, 3))
    kwargs_seen = [seen["kwargs"] for seen in module.seen]
    # Shape inference and microbatch 0 are text-only: no media kwargs at all.
    assert kwargs_seen == [
        [],
        [],
        ["image_grid_thw", "pixel_values"],
        ["image_grid_thw", "pixel_values"],
    ]
    assert "forward_one_chunk" not in vars(schedule._stage)


def test_step_with_media_leaves_out_the_empty_groups_of_the_batch_layout() -> None:
    """Gemma4's videos carry fields the seed's layout does not group with their pixels: a
    microbatch without videos gets none of them only when the step knows the layout."""
    from pp_media._layouts import GEMMA4_LAYOUT
    from pp_media._pipeline.staging import microbatch_media_kwargs

    module = Recorder()
    schedule = make_schedule(module, 3)
    batch = {
        "input_ids": torch.arange(3).repeat_interleave(3).view(3, 3),
        "pixel_values": torch.arange(3.0).view(3, 1, 1).repeat(1, 2, 4),
        "image_position_ids": torch.zeros(3, 2, 2, dtype=torch.int64),
        "n_images_per_sample": torch.ones(3, dtype=torch.int64),
        # One video of two frames, in the last sample.
        "pixel_values_videos": torch.zeros(2, 2, 4),
        "video_position_ids": torch.zeros(2, 2, 2, dtype=torch.int64),
        "num_frames_per_video": torch.tensor([2]),
        "n_videos_per_sample": torch.tensor([0, 0, 1]),
    }
    pp_media.prepare_vlm_media_for_pp(batch, 3, 3, layout=GEMMA4_LAYOUT)
    media = batch.pop(pp_media.VLM_PP_MEDIA_KEY)
    pp_media.step_with_media(
        schedule, batch["input_ids"], media=media, target=torch.zeros(3, 3), layout=GEMMA4_LAYOUT
    )
    images = ["image_position_ids", "pixel_values"]
    videos = ["num_frames_per_video", "pixel_values_videos", "video_position_ids"]
    # Shape inference (microbatch 0), then microbatches 0, 1, 2.
    both = sorted(images + videos)
    assert [seen["kwargs"] for seen in module.seen] == [images, images, images, both]
    first = {name: chunks[0] for name, chunks in media.items()}
    assert sorted(microbatch_media_kwargs(first)) == sorted(
        ["num_frames_per_video", "video_position_ids", *images]
    ), "the seed's layout does not know these video fields"


def test_an_existing_instance_override_of_the_stage_is_put_back() -> None:
    module = Recorder()
    schedule = make_schedule(module, 2)
    stage = schedule._stage
    calls: list[int] = []
    original = stage.forward_one_chunk

    def counting_forward(fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        calls.append(fwd_chunk_id)
        return original(fwd_chunk_id, *args, **kwargs)

    stage.forward_one_chunk = counting_forward
    batch = prepared_batch([1, 0, 2, 1], 2)
    with pp_media.stage_vlm_media_for_pp(schedule, [module], batch):
        schedule.step(batch["input_ids"], target=torch.zeros(4, 3))
    assert stage.forward_one_chunk is counting_forward
    assert calls == [0, 1]
    assert [seen["owners"] for seen in module.seen] == [[0], [0], [2, 2, 3]]


def test_step_with_media_gives_loss_kwargs_to_the_loss_not_to_the_model() -> None:
    module = Recorder()
    stage = PipelineStage(module, 0, 1, torch.device("cpu"))
    schedule = ScheduleGPipe(
        stage, 2, loss_fn=lambda output, target, scale=1.0: scale * output.sum()
    )
    batch = prepared_batch([1, 0, 2, 1], 2)
    media = batch.pop(pp_media.VLM_PP_MEDIA_KEY)
    losses: list[torch.Tensor] = []
    pp_media.step_with_media(
        schedule,
        batch["input_ids"],
        media=media,
        target=torch.zeros(4, 3),
        losses=losses,
        loss_kwargs={"scale": 0.0},
    )
    assert [loss.item() for loss in losses] == [0.0, 0.0]
    assert all("scale" not in seen["kwargs"] for seen in module.seen)


def test_microbatch_kwargs_leave_out_empty_groups_and_alignment_counts() -> None:
    from pp_media._pipeline.staging import microbatch_media_kwargs

    empty_images = {
        "pixel_values": torch.zeros(0, 4),
        "image_grid_thw": torch.zeros(0, 3, dtype=torch.long),
        "num_crops": torch.zeros(0, dtype=torch.long),
        "n_images_per_sample": torch.zeros(2, dtype=torch.long),
        "pixel_values_videos": torch.ones(8, 4),
        "video_grid_thw": torch.tensor([[2, 2, 2]]),
        "n_videos_per_sample": torch.tensor([1, 0]),
        "second_per_grid_ts": torch.tensor([0.5]),
    }
    kwargs = microbatch_media_kwargs(empty_images)
    assert sorted(kwargs) == ["pixel_values_videos", "second_per_grid_ts", "video_grid_thw"]
    empty_videos = {
        "pixel_values": torch.ones(4, 4),
        "image_grid_thw": torch.tensor([[1, 2, 2]]),
        "pixel_values_videos": torch.zeros(0, 4),
        "video_grid_thw": torch.zeros(0, 3, dtype=torch.long),
    }
    assert sorted(microbatch_media_kwargs(empty_videos)) == ["image_grid_thw", "pixel_values"]
