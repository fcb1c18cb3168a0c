//! A recording [`Kernel`] for tests: remembers every call in order and can be told to fail.
