"""Every check that needs no weights, so a wrong input fails in seconds, before gigabytes load."""
from __future__ import annotations

import logging
from pathlib import Path

from . import data, dataset_report, lora, models, output_guard
from .compiled_blocks import check_compile_support
from .config import TrainConfig
from .distributed import resolve_device
from .validation import validation_dir_records

log = logging.getLogger(__name__)


def preflight(config: TrainConfig) -> list[data.ImageRecord]:
    """Each model file's kind from its header, the LoRA settings tried on an empty model of the base's shape, and the
    dataset scanned (each image decoded to prove it readable, and hashed for the dataset report, whose summary and
    serious findings are logged), and the validation folder's; with compile_blocks, that torch.compile can build
    kernels on the device. Returns the dataset's records, captioned and bucketed."""
    for role, path in (("transformer", config.transformer_path), ("vae", config.vae_path),
                       ("clip", config.clip_path), ("t5", config.t5_path)):
        models.check_model_file(path, role)
    params = lora.check_lora_settings(models.transformer_config(config.transformer_path),
                                      **lora.adapter_settings(config))
    log.info("adapter: %s; %.2f M parameters", lora.describe_network(config), params / 1e6)
    if config.init_lora:
        check_init_lora(config)
    if config.compile_blocks:
        check_compile_support(resolve_device(config.device))
    report = dataset_report.report_for_config(config)
    log.info("%s", report.summary())
    for serious, finding in report.findings():
        log.log(logging.WARNING if serious else logging.INFO, "dataset: %s", finding)
    if config.cache_dir:
        check_cache_space(config.cache_dir, report)
    if config.validation_dir:
        validation_dir_records(config)
    return report.records()


def check_cache_space(cache_dir: str, report: dataset_report.DatasetReport) -> None:
    """The latent cache's disk has room for every copy the report counts (flips, augment_variants) beyond the latents
    already cached there (a rerun, another run on the same images)."""
    cached = sum(p.stat().st_size for p in Path(cache_dir).glob("latents-*.safetensors"))  # none: not made yet
    output_guard.check_free_space(cache_dir, report.latent_cache_bytes() - cached, "cache_dir",
                                  f"the latents of {report.latents_per_image} cop"
                                  f"{'y' if report.latents_per_image == 1 else 'ies'} of each image",
                                  "lower augment_variants (or turn flip_augment off)")


def check_init_lora(config: TrainConfig) -> None:
    """The init_lora file exists, is a Flux LoRA of the settings' network, and has the rank they ask for (read from
    its header; with block_ranks, loading it checks each module's)."""
    try:
        rank = lora.lora_file_rank(config.init_lora)
        network = lora.file_network(list(models.read_safetensors_header(config.init_lora).shapes))
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"init_lora: {e}") from e
    if network != config.network:
        raise ValueError(f"init_lora: {config.init_lora} is a {network} file, but network is {config.network}; set "
                         f"network to {network} to continue it")
    if rank is not None and not config.block_ranks and rank != config.rank:
        raise ValueError(f"init_lora: {config.init_lora} has rank {rank}, but rank is {config.rank}; set rank to "
                         f"{rank} to continue that LoRA")
