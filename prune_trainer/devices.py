"""Choosing and describing the torch device a job runs on (shared by the recipe and one-shot runners)."""

from __future__ import annotations

import os

import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → ``cuda`` when available else ``cpu``; anything else must name a usable torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device {name!r} is not a torch device name (use auto, cpu, cuda, cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch.cuda.is_available() is False")
    return device


def device_description(device: torch.device) -> str:
    """What ran the job: the GPU's name, or the CPU core and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
