"""Architectures of the paper and of the demo, by name.

`depth` is the target model's total depth; how it is cut into modules is the
config's business (`model.depths`), not the architecture's.
"""

PRESETS = {
    # ImageNet ViTs (shared table of the paper). H/14 has no qkv bias and eps 1e-5.
    "vit_b16": dict(patch=16, width=768, depth=12, heads=12, qkv_bias=True, ln_eps=1e-6, image_size=224, num_classes=1000),
    "vit_l16": dict(patch=16, width=1024, depth=24, heads=16, qkv_bias=True, ln_eps=1e-6, image_size=224, num_classes=1000),
    "vit_h14": dict(patch=14, width=1280, depth=32, heads=16, qkv_bias=False, ln_eps=1e-5, image_size=224, num_classes=1000),
    # High-resolution fine-tuning of the three (the paper's 384 / 392 px rows):
    # the same weights, a larger patch grid; `modassem convert --preset=...`
    # resizes a 224 checkpoint's position embedding to it.
    "vit_b16_384": dict(patch=16, width=768, depth=12, heads=12, qkv_bias=True, ln_eps=1e-6, image_size=384, num_classes=1000),
    "vit_l16_384": dict(patch=16, width=1024, depth=24, heads=16, qkv_bias=True, ln_eps=1e-6, image_size=384, num_classes=1000),
    "vit_h14_392": dict(patch=14, width=1280, depth=32, heads=16, qkv_bias=False, ln_eps=1e-5, image_size=392, num_classes=1000),
    "deit_ti": dict(patch=16, width=192, depth=12, heads=3, qkv_bias=True, ln_eps=1e-6, image_size=224, num_classes=1000),
    "deit_s": dict(patch=16, width=384, depth=12, heads=6, qkv_bias=True, ln_eps=1e-6, image_size=224, num_classes=1000),
    # CIFAR-100 at 32 px with 4-px patches: the deep, narrow models where the
    # method's gain over end-to-end training is largest.
    "deit_t32_cifar": dict(patch=4, width=192, depth=32, heads=3, qkv_bias=True, ln_eps=1e-6, image_size=32, num_classes=100),
    "deit_t128_cifar": dict(patch=4, width=192, depth=128, heads=3, qkv_bias=True, ln_eps=1e-6, image_size=32, num_classes=100),
    # The same shape at a third of DeiT-T's width, for studies a CPU can run (configs/cifar_study.py).
    "cifar_narrow": dict(patch=4, width=64, depth=32, heads=2, qkv_bias=True, ln_eps=1e-6, image_size=32, num_classes=10),
    # Deep and narrow on purpose (see the demo config): a shallow model does
    # not show the method at work.
    "demo": dict(patch=4, width=64, depth=16, heads=2, qkv_bias=True, ln_eps=1e-6, image_size=16, num_classes=10),
    # The smallest model that still has every part; for tests.
    "tiny": dict(patch=4, width=16, depth=8, heads=2, qkv_bias=True, ln_eps=1e-6, image_size=8, num_classes=10),
}

# Fields that must agree between a checkpoint and the config that loads it.
ARCH_FIELDS = ("patch", "width", "heads", "mlp_ratio", "qkv_bias", "ln_eps", "image_size", "num_classes")
