"""Integrations with training frameworks. hf_trainer needs transformers (imported on use):

    from cpl_kernels.integrations.hf_trainer import CPLReferenceCallback
"""
