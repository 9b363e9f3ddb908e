"""Procedures the scripts run over the networks in models/: vocabulary expansion, candidate
filtering, training, decoding, few-shot and denoising evaluation, metrics."""
