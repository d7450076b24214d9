//! Root filesystem tree assembly from Debian packages.
