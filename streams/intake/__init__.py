"""Intake from serving stacks: Open Inference Protocol v2 (Seldon Core 2, Triton, KServe)
and KServe v1 request/response pairs, mapped to contract inference events with a profile."""
