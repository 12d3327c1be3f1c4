"""Committed MetaSchedule records, one folder per GPU (installed as tvm_fused.tuning_logs)."""
