"""Downloading and preparing TFDS datasets, failing fast and clearly when it cannot be done.

`get_builder` is the one way the input pipelines obtain a TFDS builder: it returns a prepared
builder, prepares it when allowed (`download=True`), or says what to do. `prepare` is the body of
`python -m experiments.prepare_data`.

Offline behaviour. TFDS fetches with `requests` and retries a failed connection ten times with
exponential back-off (~3.5 minutes), then raises a raw `requests.ConnectionError`. Before asking
TFDS to download, `check_reachable` sends one HEAD request (`timeout` seconds, no retries, proxy
variables honoured) to each server named in the dataset's registered checksums whose file is not
already in the download cache or the manual folder, and raises `DownloadUnavailableError`
naming the dataset, the URL and how to prepare the data on another machine. Downloads that fail
later are reported with the same message.
"""

import os
import urllib.parse

from experiments.data import tfds_utils

IMAGENET_MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
PROBE_TIMEOUT_S = 20.0


class DownloadUnavailableError(ConnectionError):
  """A dataset could not be downloaded from this machine (offline, firewalled, server down)."""


def command(name: str, data_dir, manual_dir=None) -> str:
  """The documented shell command that prepares dataset `name` into `data_dir`."""
  cmd = f"python -m experiments.prepare_data --dataset={name} --data_dir={data_dir}"
  return cmd + (f" --manual_dir={manual_dir}" if manual_dir else "")


def _offline_message(name, url, reason, data_dir_root) -> str:
  return (
    f"Cannot download dataset {name!r}: {url} could not be reached ({reason}). This "
    f"machine looks offline or firewalled; nothing was retried. Prepare the data on a "
    f"machine with internet access: `{command(name, 'DIR')}`, then copy the folder "
    f"DIR/{name} to {os.path.join(str(data_dir_root), name)} here (or point "
    f"--config.data_dir at the copy) and rerun with --config.download=False."
  )


def _reason(error) -> str:
  """A short cause of a failed request: name lookup failed, connection refused, ..."""
  text = str(error)
  for marker, reason in (
    ("NameResolutionError", "host name lookup failed"),
    ("Connection refused", "connection refused"),
    ("Network is unreachable", "network is unreachable"),
  ):
    if marker in text:
      return f"{type(error).__name__}: {reason}"
  return type(error).__name__


def _is_cached(builder, url, url_info, manual_dir) -> bool:
  """True when TFDS would take `url` from its download cache or the manual folder."""
  tfds = tfds_utils.import_tfds()
  download_dir = os.path.join(str(builder.data_dir_root), "downloads")
  names = [tfds.core.download.resource.get_dl_fname(url, url_info.checksum)]
  candidates = [os.path.join(download_dir, n) for n in names]
  if url_info.filename:
    candidates.append(
      os.path.join(str(manual_dir or os.path.join(download_dir, "manual")), url_info.filename)
    )
  return any(os.path.exists(c) for c in candidates)


def check_reachable(builder, *, manual_dir=None, timeout: float = PROBE_TIMEOUT_S):
  """Raises DownloadUnavailableError unless every server `builder` still needs answers.

  One HEAD request per server (scheme, host, port) of the URLs in the dataset's registered
  checksums that are not cached yet; any HTTP answer (even an error status) counts as reachable.
  Datasets without registered URLs, or downloaded by hand (ImageNet), are not probed.
  """
  import requests

  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    return
  url_infos = builder.url_infos or {}
  seen = set()
  for url, info in sorted(url_infos.items()):
    parts = urllib.parse.urlsplit(url)
    origin = (parts.scheme, parts.hostname, parts.port)
    if parts.scheme not in ("http", "https") or origin in seen:
      continue
    if _is_cached(builder, url, info, manual_dir):
      continue
    seen.add(origin)
    try:
      requests.head(url, timeout=timeout, allow_redirects=False).close()
    except requests.exceptions.RequestException as e:
      reason = _reason(e)
      if isinstance(e, requests.exceptions.Timeout):
        reason += f", no answer within {timeout:g} s"
      raise DownloadUnavailableError(
        _offline_message(builder.name, url, reason, builder.data_dir_root)
      ) from None


def check_manual_files(name: str, manual_dir) -> None:
  """ImageNet: raises FileNotFoundError naming the tar files missing from `manual_dir`."""
  if name != "imagenet2012":
    return
  missing = [
    os.path.join(manual_dir, f)
    for f in IMAGENET_MANUAL_FILES
    if not os.path.isfile(os.path.join(manual_dir, f))
  ]
  if missing:
    raise FileNotFoundError(
      f"imagenet2012 cannot be prepared: missing {', '.join(missing)}. Download "
      f"{' and '.join(IMAGENET_MANUAL_FILES)} from https://image-net.org/download-images "
      f"into {manual_dir} (or pass another manual_dir); TFDS cannot download them."
    )


def default_manual_dir(data_dir) -> str:
  """`<data_dir>/downloads/manual`, where TFDS looks for hand-downloaded files."""
  return os.path.join(data_dir or tfds_utils.default_data_dir(), "downloads", "manual")


def builder_for(name: str, data_dir):
  """`tfds.builder(name, data_dir=...)`, with a clear error for unknown names."""
  tfds = tfds_utils.import_tfds()
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
      f"Unknown TFDS dataset {name!r} (see "
      "https://www.tensorflow.org/datasets/catalog/overview for the names): "
      f"{str(e).splitlines()[0]}"
    ) from None
  except ValueError as e:
    if not str(e).startswith("Parsing builder name string"):
      raise
    # TFDS's message is a 20-line grammar of builder names; its first line says enough.
    raise ValueError(
      f"{name!r} is not a TFDS dataset name (TFDS cannot parse it): names are ASCII, like "
      "cifar10, mnist or NAME/CONFIG:VERSION"
    ) from None


def prepare(name: str, data_dir=None, *, manual_dir=None, probe_timeout: float = PROBE_TIMEOUT_S):
  """Downloads and prepares TFDS dataset `name` in `data_dir` (no-op when already prepared).

  Args:
    name: a TFDS name (cifar10, cifar100, svhn_cropped, imagenet2012, mnist, ...).
    data_dir: TFDS data directory (None: `$TFDS_DATA_DIR` or ~/tensorflow_datasets).
    manual_dir: folder with hand-downloaded files (ImageNet's tar files); default
      `<data_dir>/downloads/manual`.
    probe_timeout: seconds to wait for each download server before giving up.
  Returns:
    the prepared builder.
  Raises:
    DownloadUnavailableError: a download server cannot be reached (see module docstring).
    FileNotFoundError: ImageNet's tar files are missing from `manual_dir`.
  """
  tfds = tfds_utils.import_tfds()
  builder = builder_for(name, data_dir)
  if builder.is_prepared():
    return builder
  manual_dir = manual_dir or default_manual_dir(data_dir)
  check_manual_files(builder.name, manual_dir)
  check_reachable(builder, manual_dir=manual_dir, timeout=probe_timeout)
  import requests

  config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  try:
    builder.download_and_prepare(download_config=config)
  except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
    url = getattr(getattr(e, "request", None), "url", None) or "a download server"
    raise DownloadUnavailableError(
      _offline_message(builder.name, url, _reason(e), builder.data_dir_root)
    ) from e
  return builder


def get_builder(name: str, data_dir, *, download: bool, manual_dir=None):
  """Returns the TFDS builder for `name`, preparing it first only if `download` allows it.

  Goes through `tfds.builder(...)`, the path that `tfds.testing.mock_data` patches, so tests
  under the mock never touch the network or the disk.
  """
  tfds = tfds_utils.import_tfds()
  if tfds_utils.tfds_is_mocked():
    return tfds.builder(name, data_dir=data_dir)
  builder = builder_for(name, data_dir)
  if builder.is_prepared():
    return builder
  if not download:
    raise FileNotFoundError(
      f"TFDS dataset {name!r} is not prepared in {builder.data_dir} and config.download is "
      f"False: prepare it once with `{command(name, builder.data_dir_root, manual_dir)}` "
      "(or set config.download=True)."
    )
  return prepare(name, data_dir, manual_dir=manual_dir)
