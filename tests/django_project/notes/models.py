from django.db import models


class Author(models.Model):
    name = models.CharField(max_length=60, unique=True)


class Note(models.Model):
    author = models.ForeignKey(Author, on_delete=models.CASCADE, related_name="notes")
    body = models.TextField()
    price = models.DecimalField(max_digits=8, decimal_places=2, default=0)
    done = models.BooleanField(default=False)
    created = models.DateTimeField()
    day = models.DateField(null=True)
    title = models.CharField(max_length=80, default="")
