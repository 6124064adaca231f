"""eqvae-composer: EQ-VAE fine-tuning of image autoencoders on the MosaicML stack."""

from setuptools import find_packages, setup

# Ranges we test; requirements/constraints.txt pins the exact set CI installs, which keeps
# pip's resolver from backtracking for minutes over the large Composer dependency tree.
install_requires = [
    'mosaicml==0.32.1',  # Composer; pins torch>=2.6,<2.7.1
    'torch==2.7.0',
    'torchvision==0.22.0',
    'mosaicml-streaming>=0.13.0,<0.14',
    'diffusers>=0.39.0,<0.40',
    'torchmetrics>=1.7.0,<1.7.5',
    'torch-fidelity==0.4.0',
    'pytorch-fid>=0.3.0,<0.4',  # --protocol reference: the reference's rFID
    'lpips==0.1.4',
    'opencv-python-headless>=4.10,<5',  # resize_filter: area_cv2 (the reference's cv2.INTER_AREA train crop)
    'omegaconf>=2.3,<2.5',
    'safetensors>=0.4',
    'scikit-image>=0.24,<0.27',  # ships the demo photographs
    'pillow>=10',
    'scipy>=1.10',
    'tqdm',
    'matplotlib>=3.8',
    'packaging>=22',  # eqvae_composer.compat compares the installed versions with the supported ranges
]

extras_require = {
    'dev': [
        'pytest>=8,<10',
        # a hung test fails alone, with every thread's stack, instead of running into CI's time limit
        'pytest-timeout==2.4.0',
        'ruff==0.17.6',
        'pre-commit',
        # an S3-compatible server on 127.0.0.1 for the object-store tests; boto3 is what streaming uses
        'moto[server]>=5.1,<6',
        'boto3>=1.34',
    ],
}

setup(
    name='eqvae-composer',
    version='0.1.0',
    description='EQ-VAE equivariance regularization for diffusers autoencoders, as a Composer algorithm',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    packages=find_packages(include=['eqvae_composer', 'eqvae_composer.*']),
    package_data={'eqvae_composer': ['algorithms/*/README.md']},
    python_requires='>=3.10',
    install_requires=install_requires,
    extras_require=extras_require,
)
