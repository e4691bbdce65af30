"""Training the Free-Module: SFT data, synthesis, the PEFT trainer, and the Megatron-Bridge cluster plan.

Kept free of imports so ``import freelm.training.<module>`` loads only that module.
"""
