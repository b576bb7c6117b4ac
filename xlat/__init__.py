from xlat import compiled as _compiled

_compiled.install()
