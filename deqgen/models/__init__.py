"""Model families built from deqgen's parts; each is an opt-in import (``deqgen.models.viar``)."""
