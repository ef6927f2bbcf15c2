"""A background thread that runs a batch generator ahead of the training loop."""

import queue
import threading

_DONE = object()


def _put(q, stop, item) -> bool:
  while not stop.is_set():
    try:
      q.put(item, timeout=0.1)
      return True
    except queue.Full:
      continue
  return False


def _produce(iterable, q, stop):
  # A plain function (not a method): the thread must not keep the Prefetcher alive, so that an
  # abandoned Prefetcher is garbage-collected and its __del__ stops this thread.
  try:
    for item in iterable:
      if not _put(q, stop, item):
        return
    _put(q, stop, _DONE)
  except BaseException as e:
    _put(q, stop, e)


class Prefetcher:
  """Iterates `iterable` in a daemon thread, keeping up to `size` items ready.

  The producer does the host-side work (indexing, augmentation, tf.data decoding) while the
  accelerator runs the previous step. Exceptions in the producer are re-raised in the consumer.
  `close()` (also called when the Prefetcher is garbage-collected) stops the thread.
  """

  def __init__(self, iterable, size: int = 2):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    self._queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._finished = False
    self._thread = threading.Thread(
      target=_produce,
      args=(iterable, self._queue, self._stop),
      daemon=True,
      name="input-pipeline-prefetch",
    )
    self._thread.start()

  def __iter__(self):
    return self

  def __next__(self):
    if self._finished:
      raise StopIteration
    item = self._queue.get()
    if item is _DONE:
      self._finished = True
      raise StopIteration
    if isinstance(item, BaseException):
      self._finished = True
      raise item
    return item

  def close(self):
    """Stops the producer thread (pending items are dropped)."""
    self._stop.set()
    self._finished = True

  def __del__(self):
    self.close()
