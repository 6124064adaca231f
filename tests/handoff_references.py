"""Test-only transcriptions of the latent loaders of other codebases, to read our exports with.

- ``FastDiTDataset``: chuanyangjin/fast-DiT ``train.py`` ``CustomDataset`` (and the training loop's
  ``x.squeeze(dim=1)``, ``y.squeeze(dim=1)``).
- ``RepaDataset`` and ``repa_sample_posterior``: sihyun-yu/REPA ``dataset.py`` ``CustomDataset`` (the
  PIL branch; pyspng is optional there) and ``train.py`` ``sample_posterior``.
- ``LightningDiTDataset``: hustvl/LightningDiT ``datasets/img_latent_dataset.py`` ``ImgLatentDataset``.
"""

import json
import os
from glob import glob

import numpy as np
import PIL.Image
import torch
from safetensors import safe_open
from torch.utils.data import Dataset


class FastDiTDataset(Dataset):
    def __init__(self, features_dir, labels_dir):
        self.features_dir = features_dir
        self.labels_dir = labels_dir
        self.features_files = sorted(os.listdir(features_dir))
        self.labels_files = sorted(os.listdir(labels_dir))

    def __len__(self):
        assert len(self.features_files) == len(self.labels_files), (
            'Number of feature files and label files should be same'
        )
        return len(self.features_files)

    def __getitem__(self, idx):
        feature_file = self.features_files[idx]
        label_file = self.labels_files[idx]
        features = np.load(os.path.join(self.features_dir, feature_file))
        labels = np.load(os.path.join(self.labels_dir, label_file))
        return torch.from_numpy(features), torch.from_numpy(labels)


class RepaDataset(Dataset):
    def __init__(self, data_dir):
        PIL.Image.init()
        supported_ext = PIL.Image.EXTENSION.keys() | {'.npy'}
        self.images_dir = os.path.join(data_dir, 'images')
        self.features_dir = os.path.join(data_dir, 'vae-sd')
        self._image_fnames = {
            os.path.relpath(os.path.join(root, fname), start=self.images_dir)
            for root, _dirs, files in os.walk(self.images_dir)
            for fname in files
        }
        self.image_fnames = sorted(fname for fname in self._image_fnames if self._file_ext(fname) in supported_ext)
        self._feature_fnames = {
            os.path.relpath(os.path.join(root, fname), start=self.features_dir)
            for root, _dirs, files in os.walk(self.features_dir)
            for fname in files
        }
        self.feature_fnames = sorted(fname for fname in self._feature_fnames if self._file_ext(fname) in supported_ext)
        fname = 'dataset.json'
        with open(os.path.join(self.features_dir, fname), 'rb') as f:
            labels = json.load(f)['labels']
        labels = dict(labels)
        labels = [labels[fname.replace('\\', '/')] for fname in self.feature_fnames]
        labels = np.array(labels)
        self.labels = labels.astype({1: np.int64, 2: np.float32}[labels.ndim])

    def _file_ext(self, fname):
        return os.path.splitext(fname)[1].lower()

    def __len__(self):
        assert len(self.image_fnames) == len(self.feature_fnames), (
            'Number of feature files and label files should be same'
        )
        return len(self.feature_fnames)

    def __getitem__(self, idx):
        image_fname = self.image_fnames[idx]
        feature_fname = self.feature_fnames[idx]
        with open(os.path.join(self.images_dir, image_fname), 'rb') as f:
            image = np.array(PIL.Image.open(f))
            image = image.reshape(*image.shape[:2], -1).transpose(2, 0, 1)
        features = np.load(os.path.join(self.features_dir, feature_fname))
        return torch.from_numpy(image), torch.from_numpy(features), torch.tensor(self.labels[idx])


@torch.no_grad()
def repa_sample_posterior(moments, latents_scale=1.0, latents_bias=0.0):
    mean, std = torch.chunk(moments, 2, dim=1)
    z = mean + std * torch.randn_like(mean)
    z = z * latents_scale + latents_bias
    return z


class LightningDiTDataset(Dataset):
    def __init__(self, data_dir, latent_norm=True, latent_multiplier=1.0):
        self.data_dir = data_dir
        self.latent_norm = latent_norm
        self.latent_multiplier = latent_multiplier
        self.files = sorted(glob(os.path.join(data_dir, '*.safetensors')))
        self.img_to_file_map = self.get_img_to_safefile_map()
        if latent_norm:
            self._latent_mean, self._latent_std = self.get_latent_stats()

    def get_img_to_safefile_map(self):
        img_to_file = {}
        for safe_file in self.files:
            with safe_open(safe_file, framework='pt', device='cpu') as f:
                labels = f.get_slice('labels')
                labels_shape = labels.get_shape()
                num_imgs = labels_shape[0]
                cur_len = len(img_to_file)
                for i in range(num_imgs):
                    img_to_file[cur_len + i] = {'safe_file': safe_file, 'idx_in_file': i}
        return img_to_file

    def get_latent_stats(self):
        latent_stats_cache_file = os.path.join(self.data_dir, 'latents_stats.pt')
        if not os.path.exists(latent_stats_cache_file):
            latent_stats = self.compute_latent_stats()
            torch.save(latent_stats, latent_stats_cache_file)
        else:
            latent_stats = torch.load(latent_stats_cache_file)
        return latent_stats['mean'], latent_stats['std']

    def compute_latent_stats(self):
        num_samples = min(10000, len(self.img_to_file_map))
        random_indices = np.random.choice(len(self.img_to_file_map), num_samples, replace=False)
        latents = []
        for idx in random_indices:
            img_info = self.img_to_file_map[idx]
            safe_file, img_idx = img_info['safe_file'], img_info['idx_in_file']
            with safe_open(safe_file, framework='pt', device='cpu') as f:
                features = f.get_slice('latents')
                feature = features[img_idx : img_idx + 1]
                latents.append(feature)
        latents = torch.cat(latents, dim=0)
        mean = latents.mean(dim=[0, 2, 3], keepdim=True)
        std = latents.std(dim=[0, 2, 3], keepdim=True)
        return {'mean': mean, 'std': std}

    def __len__(self):
        return len(self.img_to_file_map.keys())

    def __getitem__(self, idx):
        img_info = self.img_to_file_map[idx]
        safe_file, img_idx = img_info['safe_file'], img_info['idx_in_file']
        with safe_open(safe_file, framework='pt', device='cpu') as f:
            tensor_key = 'latents' if np.random.uniform(0, 1) > 0.5 else 'latents_flip'
            features = f.get_slice(tensor_key)
            labels = f.get_slice('labels')
            feature = features[img_idx : img_idx + 1]
            label = labels[img_idx : img_idx + 1]
        if self.latent_norm:
            feature = (feature - self._latent_mean) / self._latent_std
        feature = feature * self.latent_multiplier
        feature = feature.squeeze(0)
        label = label.squeeze(0)
        return feature, label
