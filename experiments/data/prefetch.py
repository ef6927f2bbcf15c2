"""A background thread that runs a batch generator ahead of the training loop."""
import queue
import threading

_DONE = object()


class Prefetcher:
  """Iterates `iterable` in a daemon thread, keeping up to `size` items ready.

  The producer does the host-side work (indexing, augmentation, tf.data decoding) while the
  accelerator runs the previous step. Exceptions in the producer are re-raised in the consumer.
  `close()` (also called when the iterator is garbage-collected) stops the thread.
  """

  def __init__(self, iterable, size: int = 2):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    self._queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._finished = False
    self._thread = threading.Thread(target=self._run, args=(iterable,), daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self, iterable):
    try:
      for item in iterable:
        if not self._put(item):
          return
      self._put(_DONE)
    except BaseException as e:  # pylint: disable=broad-except
      self._put(e)

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
