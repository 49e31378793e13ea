//! Python bindings of the foresightkv core (the `foresightkv._native` module).
