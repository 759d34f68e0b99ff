"""The seed's example CNN with ``gnorm.GroupNorm``, trained on MNIST digits.

``input_pipeline`` loads the data (the embedded 5,000 digits, or MNIST IDX
files), ``idx`` parses IDX files, ``models`` holds the network and its
summary table, and ``train`` holds ``train_step``, ``evaluate`` and
``train``. ``examples/mnist_cnn.py`` is the command-line entry point.
"""
