"""An example of a method that lives outside caphuman-bench (see the README's "Methods from your own package")."""
