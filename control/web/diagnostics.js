// Diagnostics: in progress.
